"""kdkit's performance benchmarks (not part of the test suite). Run them all: ``python -m benchmarks.run_all``.

See docs/PERFORMANCE.md for what each one measures, the tables, and how to read them.
"""
