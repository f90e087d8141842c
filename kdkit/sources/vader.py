"""VADER's human-rated snippets (Hutto & Gilbert, ICWSM 2014) as two-class sentiment data: negative / positive.

    python -m kdkit.sources.vader --out .data/vader-movies                    # 10,605 Rotten Tomatoes snippets
    python -m kdkit.sources.vader --domain nyt --out .data/vader-nyt          # or tweets, amazon

fetches the source archive of ``vaderSentiment==3.3.2`` from PyPI with ``pip download`` (2.5 MB). It carries
``additional_resources/hutto_ICWSM_2014.tar.gz``, the paper's data set, a tarball inside the tarball; this module
reads one ground-truth file out of the inner tarball without unpacking anything and writes

    train.jsonl   {"sentence": ..., "label": "negative" | "positive"}   (movies: 8,453 rows)
    dev.jsonl     the same fields; a stratified, seeded 20 % of each class (movies: 2,113 rows)
    README.txt    where the data comes from, its licence and the label rule
    MANIFEST.json sha256 of the three files above and of the archives, the settings, the counts, the dropped rows

The domains and their files (``hutto_ICWSM_2014/<file>``; tab-separated id, mean rating, text; UTF-8, CRLF):

    movies   movieReviewSnippets_GroundTruth.txt    10,605 rows  Rotten Tomatoes review sentences (Pang & Lee)
    nyt      nytEditorialSnippets_GroundTruth.txt    5,190 rows  New York Times editorial sentences
    tweets   tweets_GroundTruth.txt                  4,200 rows  tweet-like texts (4,000 real, 200 contrived)
    amazon   amazonReviewSnippets_GroundTruth.txt    3,708 rows  Amazon product review sentences (Hu & Liu 2004)

The label rule. Each row's score is the mean of 20 or more human ratings on a scale of -4 to +4; the label is its
sign. A mean of exactly 0 has no sign (the raters called it neutral, or cancelled out): such rows are dropped and
counted. Texts are stripped of surrounding blanks; rows with the same text are one text: the first in file order
is kept when all its copies have the same sign (0 counting as a sign here), and every copy is dropped when they do
not (the raters of the copies disagree on its polarity). Measured on the real files, rows dropped as zero /
duplicate copy / conflicting copies, and rows kept: movies 37 / 2 / 0, 10,566 (5,325 negative); nyt 235 / 57 / 28,
4,870; tweets 4 / 0 / 0, 4,196; amazon 97 / 10 / 2, 3,599.

Near-duplicates that differ in case ("wow" / "WOW" among the tweets, many of them contrived to test VADER's rules)
are different texts here. The movie snippets come from the same Rotten Tomatoes pages as Pang & Lee's sentence
polarity data (:mod:`kdkit.sources.polarity`), so the two data sets share sentences: never train on one and
evaluate on the other as if they were independent (3,965 of the 4,000 polarity sentences are movie snippets here,
with the same label for 3,861 of them).

In a recipe::

    [data]
    files = { train = ".data/vader-movies/train.jsonl", validation = ".data/vader-movies/dev.jsonl" }
    text = ["sentence"]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdkit.errors import DataError
from kdkit.sources import common
from kdkit.sources.common import Archive, Converted, Result

SOURCE = common.Source("vaderSentiment==3.3.2")
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
LABEL_NAMES = ["negative", "positive"]
FORMAT = "kdkit-vader-1"
#: The rating scale of the paper: a mean outside it means the column is not a mean rating.
SCALE = 4.0


@dataclass(frozen=True)
class Domain:
    """One ground-truth file of the inner tarball."""

    member: str
    rows: int
    description: str


DOMAINS = {
    "movies": Domain(
        "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        10605,
        "sentence-level snippets of Rotten Tomatoes movie reviews, from the reviews of Pang & Lee (2004)",
    ),
    "nyt": Domain(
        "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
        5190,
        "sentence-level snippets of 500 New York Times opinion editorials",
    ),
    "tweets": Domain(
        "hutto_ICWSM_2014/tweets_GroundTruth.txt",
        4200,
        "tweet-like texts: 4,000 inspired by tweets from Twitter's public timeline, 200 contrived to test rules",
    ),
    "amazon": Domain(
        "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
        3708,
        "sentence-level snippets of 309 Amazon customer reviews of 5 products (Hu & Liu, 2004)",
    ),
}

_README = """\
{title}
{underline}

Source: the data set of C.J. Hutto and Eric Gilbert, "VADER: A Parsimonious Rule-based Model
for Sentiment Analysis of Social Media Text", ICWSM 2014; from it the file
  {member}
({description}), which lies in
  {inner}
inside the PyPI source archive {package}
({archive}, sha256 {archive_sha256}),
fetched with `pip download --no-deps {pip_flag} {package}`.

Licence: the package, its additional resources included, is distributed under the MIT licence
(Copyright (c) 2016 C.J. Hutto; LICENSE.txt of the archive). The snippets themselves are excerpts
of third-party text (reviews, editorials, tweets); cite the paper, keep to research use, and do
not redistribute them: kdkit never commits this data.

Label rule: each snippet's score is the mean of 20 or more human ratings from -4 (extremely
negative) to +4 (extremely positive); the label is its sign: "negative" below 0, "positive"
above 0. Rows whose mean is exactly 0 have no sign and are dropped ({zero} here). Texts are
stripped of surrounding blanks; of rows with the same text the first is kept when all copies have
the same sign, 0 included ({copies} later copies dropped), and all are dropped when their signs
differ ({conflicting} rows). {rows} rows read, {kept} kept.

Files: train.jsonl ({n_train} rows) and dev.jsonl ({n_dev} rows), one JSON object a line with
"sentence" and "label". The split is stratified by label: {dev_percent}% of each class goes to
dev, drawn with numpy seed {seed}.
"""


def parse_ground_truth(raw: bytes, source: str, expected_rows: int) -> list[tuple[str, str, float]]:
    """``[(id, text, mean rating), ...]`` in file order: one row a line, three tab-separated fields."""
    text = common.decode_utf8(raw, source)
    rows: list[tuple[str, str, float]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): it also splits at \x0c, \u2028
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(
                f"{source}, line {number}: expected 3 tab-separated fields (id, mean rating, text), got "
                f"{len(fields)}: {line[:80]!r}"
            )
        row_id, score_text, snippet = fields[0].strip(), fields[1].strip(), fields[2].strip()
        try:
            score = float(score_text)
        except ValueError:
            score = math.nan
        if not math.isfinite(score) or abs(score) > SCALE:
            raise DataError(
                f"{source}, line {number}: mean rating {fields[1]!r} is not a number from -{SCALE:g} to {SCALE:g}"
            )
        if not snippet:
            raise DataError(f"{source}, line {number}: the text is empty")
        if row_id in seen:
            raise DataError(f"{source}, line {number}: id {row_id!r} already used on line {seen[row_id]}")
        seen[row_id] = number
        rows.append((row_id, snippet, score))
    if len(rows) != expected_rows:
        raise DataError(f"{source}: {len(rows)} rows, expected {expected_rows}: is this the right file?")
    return rows


def _sign(score: float) -> int:
    return (score > 0) - (score < 0)


def _settings(domain: str) -> dict[str, object]:
    return common.manifest_settings(FORMAT, SOURCE, f"{INNER}:{DOMAINS[domain].member}", domain=domain)


def is_complete(out: Path, domain: str = "movies") -> dict | None:
    """The manifest of ``out`` when it matches the settings of ``domain`` and every file its checksum; else None."""
    return common.is_complete(out, _settings(domain))


def convert(archive: Archive, domain: str = "movies", expected_rows: int | None = None) -> Converted:
    """The data set made of ``domain``'s ground-truth file in the tarball inside ``archive``. ``expected_rows``
    defaults to the size of the real file."""
    spec = DOMAINS[domain]
    inner = archive.nested(INNER, hint="hutto")
    raw = inner.read(spec.member, hint="GroundTruth")
    source = f"{inner.name}:{spec.member}"
    rows = parse_ground_truth(raw, source, spec.rows if expected_rows is None else expected_rows)
    unique = common.drop_duplicates([text for _, text, _ in rows], [_sign(score) for _, _, score in rows])
    kept = [i for i in unique.kept if _sign(rows[i][2]) != 0]
    zero = len(unique.kept) - len(kept)
    records = [{"sentence": rows[i][1], "label": "positive" if rows[i][2] > 0 else "negative"} for i in kept]
    files, counts = common.split_files(records, LABEL_NAMES, source)
    dropped = {
        "with a mean rating of 0": zero,
        "duplicate copies": unique.copies,
        "copies whose ratings differ in sign": unique.conflicting,
    }
    title = f"VADER ground truth, {domain}, prepared by `python -m kdkit.sources.vader --domain {domain}`"
    files["README.txt"] = common.readme(
        _README,
        SOURCE,
        archive,
        counts,
        title=title,
        underline="=" * len(title),
        member=spec.member,
        description=spec.description,
        inner=INNER,
        zero=zero,
        copies=unique.copies,
        conflicting=unique.conflicting,
        rows=len(rows),
        kept=len(kept),
    )
    record = {"inner_sha256": common.sha256(inner.data), "member_sha256": common.sha256(raw), "rows_read": len(rows)}
    return Converted(files, LABEL_NAMES, counts, dropped, record)


def prepare(
    out: str | Path,
    domain: str = "movies",
    archive: str | Path | None = None,
    force: bool = False,
    expected_rows: int | None = None,
) -> Result:
    """Build ``domain``'s data set in ``out`` unless it is already complete. Downloads the archive when none is
    given."""
    if domain not in DOMAINS:
        raise DataError(f"unknown VADER domain '{domain}'; available: {', '.join(DOMAINS)}")
    return common.prepare(
        out,
        source=SOURCE,
        settings=_settings(domain),
        convert=lambda opened: convert(opened, domain, expected_rows=expected_rows),
        archive=archive,
        force=force,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.argument_parser(
        "kdkit.sources.vader",
        "Build a two-class sentiment data set from VADER's human-rated snippets (vaderSentiment source archive).",
        default_out=".data/vader-<domain>",
        archive_help="use this vaderSentiment-3.3.2 source archive instead of downloading it",
    )
    parser.add_argument("--domain", choices=list(DOMAINS), default="movies", help="which snippets (default: movies)")
    return common.run_command(parser, _prepare_from_arguments, argv)


def _prepare_from_arguments(args: argparse.Namespace) -> Result:
    """:func:`prepare` as the command line asks, ``<domain>`` in ``--out`` replaced by the domain."""
    out = args.out.replace("<domain>", args.domain)
    return prepare(out, args.domain, archive=args.archive, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
