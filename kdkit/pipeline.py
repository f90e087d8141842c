"""Compatibility alias of kdkit 0.1's module layout: the pipeline lives in :mod:`kdkit.stages` now."""

from kdkit.stages.run import run_pipeline, run_recipe

__all__ = ["run_pipeline", "run_recipe"]
