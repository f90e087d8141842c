"""Experiments over many runs: ``kdkit ablate`` and ``kdkit sweep`` (one variant runner), ``kdkit report``
(the paper's Table 2 with t-tests), and their tables and plots."""

from kdkit.experiments.report import Report, build_report, load_run, report_runs
from kdkit.experiments.stats import TTest, smallest_detectable, t_test
from kdkit.experiments.variants import (
    Experiment,
    Variant,
    ablate,
    ablation_variants,
    parse_sweep,
    split_values,
    sweep,
    sweep_variants,
)

__all__ = [
    "Experiment",
    "Report",
    "TTest",
    "Variant",
    "ablate",
    "ablation_variants",
    "build_report",
    "load_run",
    "parse_sweep",
    "report_runs",
    "smallest_detectable",
    "split_values",
    "sweep",
    "sweep_variants",
    "t_test",
]
