"""The pipeline's stages, each a function with typed inputs and outputs, called in order by
:func:`kdkit.stages.run.run_pipeline`: data -> teachers -> teacher outputs -> students -> evaluation."""

from kdkit.stages.results import Results
from kdkit.stages.run import run_pipeline, run_recipe

__all__ = ["Results", "run_pipeline", "run_recipe"]
