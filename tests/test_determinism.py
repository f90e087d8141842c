"""Determinism (issue 6): the same recipe and seeds, run twice on the CPU from scratch (separate caches and output
directories), give identical results.json figures, teachers, teacher logits and student predictions.

Across processes the same holds (teachers and logits bit for bit): tests/test_resume.py compares a run resumed in
other processes with one made in this process.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helpers_models import make_bert, quick_recipe
from helpers_reliability import one_thread
from kdkit.stages.run import run_recipe
from kdkit.recipe import validate_recipe

#: Figures that depend on where and how fast a run happened, not on what it computed.
VOLATILE = {"seconds", "run_dir", "recipe_file", "path", "directory", "trained_now", "reused"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def test_the_same_recipe_twice_gives_identical_results(tmp_path: Path) -> None:
    base = make_bert(tmp_path / "base", layers=1, seed=0)
    runs = []
    for name in ("first", "second"):
        root = tmp_path / name
        data = quick_recipe(
            root, base,
            **{"seeds": [1, 2], "teachers.max_steps": 8, "student.max_steps": 6, "student.label_only_baseline": True},
        )
        run_recipe(validate_recipe(data), console=Console(file=io.StringIO()), print_table=False)
        runs.append((root, json.loads((root / "runs" / "tiny" / "results.json").read_text())))
    (root1, first), (root2, second) = runs

    assert _stable(first) == _stable(second)
    assert first["cache"]["teachers_trained"] == second["cache"]["teachers_trained"] == 2  # both from scratch
    for a, b in zip(first["teachers"], second["teachers"], strict=True):
        assert Path(a["path"]).is_relative_to(root1) and Path(b["path"]).is_relative_to(root2)
        assert (Path(a["path"]) / "model.safetensors").read_bytes() == (Path(b["path"]) / "model.safetensors").read_bytes()
    for path in (root1 / "cache" / "logits").glob("*.safetensors"):
        assert torch.equal(load_file(str(path))["logits"], load_file(str(root2 / "cache" / "logits" / path.name))["logits"])
    logits = {}
    for block in ("student", "labels_only"):
        for a, b in zip(first[block]["runs"], second[block]["runs"], strict=True):
            x = load_file(str(Path(a["directory"]) / "eval_logits.safetensors"))["logits"]
            y = load_file(str(Path(b["directory"]) / "eval_logits.safetensors"))["logits"]
            assert torch.equal(x, y), (block, a["seed"])
            logits[block, a["seed"]] = x
    # and the seeds do matter: another seed is another student
    assert not torch.allclose(logits["student", 1], logits["student", 2])
    assert not torch.allclose(logits["student", 1], logits["labels_only", 1])
