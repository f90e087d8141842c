"""Two processes (issues 6 and 12): ``torchrun --nproc_per_node 2`` (gloo, CPU) runs a tiny recipe with three
teachers and a global batch of 16.

* Teachers: two are dealt whole, one per process, and trained there alone (no gradient all-reduce); they are byte
  for byte the teachers a one-process run trains, under the same cache keys. The third (left over) trains with
  DDP over both processes, 8 samples each per step.
* Teacher outputs: every (teacher, split) file is built by both processes together, each predicting about half of
  each split's rows, and written once; the files equal a one-process build byte for byte.
* Student: trained with DDP at the same global batch, it matches a one-process run within ``TOLERANCE``, and its
  eval predictions (sharded too) are those of its weights.

With dropout off, two processes at 8 samples each see, step by step, the same samples as one process at 16 (each
takes every other batch of one shuffled order), and DDP averages their gradients: the runs differ only by float
rounding. ``TOLERANCE`` is the bound docs/RELIABILITY.md states.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file

from helpers_models import make_bert, quick_recipe
from helpers_reliability import kdkit_env, one_thread, run_kdkit, write_recipe
from kdkit.recipe import validate_recipe
from kdkit.stages.run import run_recipe
from kdkit.store.files import verify_complete_marker

#: Largest difference allowed between the eval logits of the two-process and the one-process student.
TOLERANCE = 1e-6  # measured here: 2e-8

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def _without_dropout(directory: Path) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _eval_logits(run: dict) -> torch.Tensor:
    return load_file(str(Path(run["directory"]) / "eval_logits.safetensors"))["logits"]


def _logit_files(cache: Path) -> dict[tuple[str, str], tuple[str, bytes]]:
    """``{(teacher name, split): (file name, bytes)}`` of a cache's logit files."""
    found = {}
    for path in (cache / "logits").glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        found[(meta["teacher"], meta["split"])] = (path.name, path.read_bytes())
    return found


def test_torchrun_two_processes_share_the_work_and_match_one_process(tmp_path: Path) -> None:
    base = _without_dropout(make_bert(tmp_path / "base", layers=1, seed=0))
    settings = {
        "teachers.seeds": [1, 2, 3], "teachers.max_steps": 4, "teachers.batch_size": 16, "teachers.eval_batch_size": 8,
        # evaluated on the tune split and checkpointed every 2 steps, the best checkpoint loaded at the end: a
        # teacher trained alone in process 1 writes its own checkpoints (transformers writes on rank 0 only)
        "teachers.early_stopping": {"eval_steps": 2, "patience": 5},
        "student.max_steps": 6, "student.save_steps": 3, "student.batch_size": 16,
    }
    path = write_recipe(tmp_path / "two" / "recipe.toml", quick_recipe(tmp_path / "two", base, **settings))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kdkit", "run", str(path), "--json"],
        cwd=tmp_path, env=kdkit_env(), capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads(done.stdout)  # one document: rank 0 alone prints it
    assert done.stderr.count("4/5 student (1 seed)") == 2  # both processes ran the pipeline
    cache = tmp_path / "two" / "cache"

    # teachers: 1 and 2 trained alone (one per process), 3 by both together; each written to the cache once
    entries = [p for p in (cache / "teachers").iterdir() if p.is_dir()]
    assert len(entries) == 3 and all(verify_complete_marker(p) is None for p in entries)
    assert not list(cache.rglob(".tmp-*"))
    teachers = results["teachers"]
    assert [t["steps"] for t in teachers] == [4, 4, 4]
    assert all(t["best_step"] in (2, 4) for t in (json.loads((Path(t["path"]) / "kdkit-teacher.json").read_text())
                                                  ["training"] for t in teachers))
    assert results["cache"]["teachers_trained"] == 3
    layout = [json.loads((Path(t["path"]) / "kdkit-teacher.json").read_text())["training"] for t in teachers]
    assert [(x["processes"], x["per_device_batch"]) for x in layout] == [(1, 16), (1, 16), (2, 8)]
    assert done.stderr.count("training teacher 1 (seed 1)") == 1 and done.stderr.count("training teacher 2") == 1
    assert done.stderr.count("training teacher 3 (seed 3)") == 2

    # teacher outputs: 3 teachers x 4 splits, each file built by both processes, about half each, written once
    sizes = results["data"]
    assert len(list((cache / "logits").glob("*.safetensors"))) == 12
    for split in ("labeled", "unlabeled", "tune", "eval"):
        rows = sizes[split]
        shares = [int(m) for m in re.findall(rf"{split} split: this process predicted (\d+) of 3 x {rows} rows", done.stderr)]
        assert len(shares) == 2 and sum(shares) == 3 * rows, (split, shares)
        assert all(0.3 <= s / (3 * rows) <= 0.7 for s in shares), (split, shares)

    # one process, the same recipe, its own cache: the same teacher keys; the teachers trained alone and their
    # logit files are byte for byte the same
    one_path = write_recipe(
        tmp_path / "one" / "recipe.toml",
        quick_recipe(tmp_path / "one", base, **{**settings, "teachers.seeds": [1, 2]}),
    )
    alone = run_kdkit(["run", str(one_path), "--json"], cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = json.loads(alone.stdout)
    assert [t["key"] for t in single["teachers"]] == [t["key"] for t in teachers[:2]]
    for ours, theirs in zip(teachers[:2], single["teachers"], strict=True):
        assert (Path(ours["path"]) / "model.safetensors").read_bytes() == (
            Path(theirs["path"]) / "model.safetensors"
        ).read_bytes()
    two_files, one_files = _logit_files(cache), _logit_files(tmp_path / "one" / "cache")
    assert len(one_files) == 8
    for where, (name, data) in one_files.items():
        assert two_files[where] == (name, data), where

    # teacher 3 and the student: one process, in this process, on the checkpoints the two processes trained
    def one_process(batch_size: int) -> dict:
        data = quick_recipe(tmp_path / "in", base, **{**settings, "student.batch_size": batch_size})
        data["teachers"] = {"checkpoints": [t["path"] for t in teachers], "eval_batch_size": 8}
        return run_recipe(validate_recipe(data), console=Console(file=io.StringIO()), print_table=False)

    one = one_process(16)
    built_alone = _logit_files(tmp_path / "in" / "cache")
    for (teacher, split), (_, data) in built_alone.items():  # the same tensors, bit for bit, for every teacher
        index = int(teacher.split()[1]) - 1
        [(_, ours)] = [v for (t, s), v in two_files.items() if s == split and t.startswith(f"teacher {index + 1} ")]
        assert _tensor(ours) == _tensor(data), (teacher, split)
    assert [t["metrics"] for t in one["teachers"]] == [t["metrics"] for t in teachers]
    [ddp_run], [one_run] = results["student"]["runs"], one["student"]["runs"]
    assert ddp_run["steps"] == one_run["steps"] == 6
    ddp_logits, one_logits = _eval_logits(ddp_run), _eval_logits(one_run)
    difference = float((ddp_logits - one_logits).abs().max())
    assert difference <= TOLERANCE, difference
    assert ddp_run["metrics"] == one_run["metrics"]

    # and the two processes really trained one model together: one process at 8 is another student
    other = one_process(8)
    assert float((_eval_logits(other["student"]["runs"][0]) - ddp_logits).abs().max()) > 1000 * TOLERANCE


def _tensor(data: bytes) -> bytes:
    """The tensor bytes of a logit file (its metadata names the teacher, which differs between the runs)."""
    from safetensors.torch import load

    return load(data)["logits"].numpy().tobytes()
