"""Kill and resume (issue 6): ``kdkit run`` killed (SIGKILL) while a teacher trains, while a teacher-logit file is
written and while the student saves a checkpoint, then stopped with Ctrl-C (SIGINT), is continued by running the
same command again, and ends with the results of an uninterrupted run.

Each interrupted run is a real ``kdkit`` process stopped at a named point by tests/helpers_reliability.py (no
timing involved). The uninterrupted reference runs in this process with its own cache and output directories.
"""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helpers_models import make_bert, quick_recipe
from helpers_reliability import one_thread, run_kdkit, write_recipe
from kdkit.stages.run import run_recipe
from kdkit.store.logits import read_logits
from kdkit.recipe import validate_recipe
from kdkit.store.files import verify_complete_marker


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("resume") / "base", layers=1, seed=0)


def tiny(root: Path, base: Path) -> dict:
    """Two teachers of 12 steps; a student of 12 steps at batch 8 with a checkpoint every 3 steps."""
    return quick_recipe(
        root, base,
        **{"teachers.max_steps": 12, "student.batch_size": 8, "student.max_steps": 12, "student.save_steps": 3},
    )


def _entries(directory: Path) -> tuple[list[Path], list[Path]]:
    """(finished entries, leftovers of interrupted writes) of a cache folder."""
    items = [p for p in directory.iterdir() if not p.name.endswith(".lock")] if directory.exists() else []
    return (
        sorted(p for p in items if not p.name.startswith(".tmp-")),
        sorted(p for p in items if p.name.startswith(".tmp-")),
    )


def _stamp(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_killed_in_every_stage_then_resumed_gives_the_uninterrupted_results(tmp_path: Path, base: Path) -> None:
    reference_root = tmp_path / "reference"
    reference = run_recipe(
        validate_recipe(tiny(reference_root, base)), console=Console(file=io.StringIO()), print_table=False
    )

    work = tmp_path / "work"
    args = ["run", str(write_recipe(work / "recipe.toml", tiny(work, base)))]
    teachers, logits = work / "cache" / "teachers", work / "cache" / "logits"
    run_dir = work / "runs" / "tiny"

    # ---- 1. SIGKILL at step 5 of the second teacher's training
    killed = run_kdkit(args, cwd=work, stop="teacher-step:2:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (first,), (unfinished,) = _entries(teachers)
    assert verify_complete_marker(first) is None
    assert unfinished.is_dir() and not (unfinished / ".complete").exists()
    assert not logits.exists() and not (run_dir / "results.json").exists()
    first_stamp = _stamp(first)

    # ---- 2. SIGKILL halfway through writing the sixth logit file (teacher 2, unlabeled split)
    killed = run_kdkit(args, cwd=work, stop="logit-write:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "teacher 1 (seed 1): reusing" in killed.stderr and "training teacher 1" not in killed.stderr
    assert "training teacher 2 (seed 2)" in killed.stderr
    assert _stamp(first) == first_stamp  # the finished teacher was not touched
    finished, leftovers = _entries(teachers)
    assert len(finished) == 2 and leftovers == [] and all(verify_complete_marker(p) is None for p in finished)
    files, (half,) = _entries(logits)
    assert len(files) == 5
    with pytest.raises(ValueError):
        read_logits(half)  # really cut in half: unusable

    # ---- 3. SIGKILL while the student saves checkpoint-6 (weights and optimizer written, trainer state not)
    killed = run_kdkit(args, cwd=work, stop="student-save:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "training teacher" not in killed.stderr
    assert "3 logit files built, 5 read" in killed.stderr  # the half-written file was never read
    files, leftovers = _entries(logits)
    assert len(files) == 8 and leftovers == []
    (student,) = [p for p in (run_dir / "students").iterdir() if p.is_dir()]  # not its .lock
    assert (student / "checkpoint-3" / "trainer_state.json").is_file()
    assert (student / "checkpoint-6" / "model.safetensors").is_file()
    assert not (student / "checkpoint-6" / "trainer_state.json").exists()

    # ---- 4. Ctrl-C at step 8: exit 130, a message saying how to continue, no traceback
    stopped = run_kdkit(args, cwd=work, stop="student-sigint:8")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr + stopped.stdout
    assert f"checkpoint {student / 'checkpoint-6'} was not written completely" in stopped.stderr
    assert f"resuming student (seed 1) from {student / 'checkpoint-3'}" in stopped.stderr
    tail = stopped.stderr.strip().splitlines()[-1]
    assert tail.startswith("interrupted: ") and "run the same command again" in tail
    assert (student / "checkpoint-6" / "trainer_state.json").is_file()  # saved again, completely
    assert not (run_dir / "results.json").exists() and not (student / "done.json").exists()

    # ---- 5. the same command again: nothing in the way
    done = run_kdkit([*args, "--json"], cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming student (seed 1) from {student / 'checkpoint-6'}" in done.stderr
    results = json.loads(done.stdout)
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["cache"] == {"teachers_trained": 0, "logits_built": [], "logits_read": 8}
    assert not list(student.glob("checkpoint-*")) and (student / "done.json").is_file()

    # ---- equal to the uninterrupted run: teachers and logits bit for bit, every metric
    for name in ("data", "teachers", "teacher_mean", "ensemble"):
        strip = (lambda rows: [{k: v for k, v in r.items() if k not in ("path", "trained_now")} for r in rows])
        got, want = results[name], reference[name]
        if name == "teachers":
            got, want = strip(got), strip(want)
        assert got == want, name
    for row in results["teachers"]:
        ours = Path(row["path"]) / "model.safetensors"
        theirs = reference_root / "cache" / "teachers" / row["key"] / "model.safetensors"
        assert ours.read_bytes() == theirs.read_bytes()
    for path in (work / "cache" / "logits").glob("*.safetensors"):
        twin = reference_root / "cache" / "logits" / path.name
        assert torch.equal(read_logits(path), read_logits(twin)), path.name
    [run] = results["student"]["runs"]
    [ref_run] = reference["student"]["runs"]
    assert run["steps"] == ref_run["steps"] == 12
    assert run["metrics"] == ref_run["metrics"]
    torch.testing.assert_close(
        load_file(str(student / "eval_logits.safetensors"))["logits"],
        load_file(str(Path(ref_run["directory"]) / "eval_logits.safetensors"))["logits"],
        rtol=1e-5, atol=1e-6,
    )
