"""Cache integrity (issue 6): two ``kdkit run`` processes sharing one cache at the same time train each teacher
and build each logit file once between them; damaged cache files (truncated, bytes flipped) are detected,
reported and rebuilt, and the run's figures do not change.

The two runs are made to overlap for certain, not by timing: the first holds the lock of its first teacher
until the second has found that lock taken (see tests/helpers_reliability.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from helpers_models import make_bert, quick_recipe
from helpers_reliability import one_thread, start_kdkit, wait_for, write_recipe
from kdkit import cli
from kdkit.plugin.registry import BLOCK_ENV_VAR
from kdkit.store.files import verify_complete_marker
from kdkit.store.logits import CacheWarning, read_logits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def _recipe(root: Path, base: Path, output: str) -> dict[str, Any]:
    return quick_recipe(
        root, base, **{"output_dir": str(root / output), "teachers.max_steps": 8, "student.max_steps": 6}
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs of the same recipe (different output directories, one cache) that overlap."""
    root = tmp_path_factory.mktemp("shared")
    base = make_bert(root / "base", layers=1, seed=0)
    sync = root / "sync"
    sync.mkdir()
    recipes = {name: write_recipe(root / f"{name}.toml", _recipe(root, base, f"runs-{name}")) for name in "ab"}
    first = start_kdkit(["run", str(recipes["a"]), "--json"], cwd=root, stop=f"hold-teacher-lock:{sync}")
    wait_for(sync / "holding", first)  # a holds the lock of teacher 1 and waits
    second = start_kdkit(["run", str(recipes["b"]), "--json"], cwd=root, stop=f"probe-teacher-lock:{sync}")
    outputs = {}
    for name, process in (("a", first), ("b", second)):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, (name, err[-3000:])
        outputs[name] = {"results": json.loads(out), "stderr": err}
    return {"root": root, "base": base, "recipes": recipes, **outputs}


def test_two_runs_sharing_a_cache_build_each_entry_once(shared: dict[str, Any]) -> None:
    a, b = shared["a"]["results"], shared["b"]["results"]
    assert (shared["root"] / "sync" / "waiting").exists()  # b really found the lock taken while a held it
    # teachers: a trained both while b waited for each lock, then found each one complete
    assert a["cache"]["teachers_trained"] == 2 and b["cache"]["teachers_trained"] == 0
    assert "training teacher" not in shared["b"]["stderr"]
    # logits: 2 teachers x 4 splits, each file built by exactly one of the runs
    built = a["cache"]["logits_built"] + b["cache"]["logits_built"]
    assert len(built) == len(set(built)) == 8
    assert a["cache"]["logits_read"] + b["cache"]["logits_read"] == 8
    cache = shared["root"] / "cache"
    teachers = [p for p in (cache / "teachers").iterdir() if p.is_dir()]
    assert len(teachers) == 2 and all(verify_complete_marker(p) is None for p in teachers)
    assert len(list((cache / "logits").glob("*.safetensors"))) == 8
    assert not list(cache.rglob(".tmp-*"))
    # and both runs computed the same figures from the same files
    for key in ("teachers", "teacher_mean", "ensemble"):
        strip = (lambda x: [{k: v for k, v in r.items() if k != "trained_now"} for r in x] if key == "teachers" else x)
        assert strip(a[key]) == strip(b[key])
    assert a["student"]["runs"][0]["metrics"] == b["student"]["runs"][0]["metrics"]


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def _truncate(path: Path, keep: float = 0.6) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def test_damaged_cache_files_are_detected_reported_and_rebuilt(shared: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(shared["root"] / "cache", cache)
    before = shared["a"]["results"]
    [t1, t2] = [cache / "teachers" / row["key"] for row in before["teachers"]]
    t1_weights, t2_weights = (t1 / "model.safetensors").read_bytes(), (t2 / "model.safetensors").read_bytes()
    # clone: a tensor read from a safetensors file may map the file, and the damage below would show through it
    logit_files = {path.name: read_logits(path).clone() for path in (cache / "logits").glob("*.safetensors")}

    def logit_file(teacher: str, split: str) -> Path:
        for path in (cache / "logits").glob("*.safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata()
            if meta["teacher"] == teacher and meta["split"] == split:
                return path
        raise AssertionError((teacher, split))

    _truncate(t1 / "model.safetensors")  # teacher 1: cut weights
    _flip(t2 / "model.safetensors", len(t2_weights) - 9)  # teacher 2: one bit of one weight
    cut = logit_file("teacher 1 (seed 1)", "eval")
    flipped = logit_file("teacher 2 (seed 2)", "labeled")
    header = logit_file("teacher 2 (seed 2)", "tune")
    _truncate(cut)
    _flip(flipped, flipped.stat().st_size - 3)  # a byte of the last float: parses, fails its checksum
    _flip(header, 12)  # inside the JSON header

    data = _recipe(shared["root"], shared["base"], "unused")
    data.update(output_dir=str(tmp_path / "runs"), cache_dir=str(cache))
    recipe = write_recipe(tmp_path / "recipe.toml", data)
    with pytest.warns(CacheWarning) as caught:
        result = CliRunner().invoke(cli.app, ["run", str(recipe), "--json"], env={BLOCK_ENV_VAR: None})
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 5  # 2 teachers, 3 logit files
    assert result.exit_code == 0, result.stderr[-3000:]
    after = json.loads(result.stdout)
    err = " ".join(result.stderr.split())  # the console may wrap long lines
    for teacher, path in (("teacher 1 (seed 1)", t1), ("teacher 2 (seed 2)", t2)):
        assert f"{teacher}: cached checkpoint {path} is unusable (model.safetensors does not match its checksum); " \
            "training it again" in err
    for path, what in ((cut, "teacher 1 (seed 1), eval"), (flipped, "teacher 2 (seed 2), labeled"),
                       (header, "teacher 2 (seed 2), tune")):
        assert f"logit cache {path.name} ({what}) is " in err and "; rebuilding it" in err
    assert "checksum mismatch (the file is corrupt)" in err

    assert after["cache"]["teachers_trained"] == 2
    assert sorted(after["cache"]["logits_built"]) == sorted(
        ["teacher 1 (seed 1)/eval", "teacher 2 (seed 2)/labeled", "teacher 2 (seed 2)/tune"]
    )
    # rebuilt exactly as they were: same seeds, same thread count, on the CPU
    assert (t1 / "model.safetensors").read_bytes() == t1_weights
    assert (t2 / "model.safetensors").read_bytes() == t2_weights
    for name, tensor in logit_files.items():
        assert torch.equal(read_logits(cache / "logits" / name), tensor), name
    for key in ("teacher_mean", "ensemble"):
        assert after[key] == before[key]
    assert after["student"]["runs"][0]["metrics"] == before["student"]["runs"][0]["metrics"]
    assert not list(cache.rglob(".tmp-*"))
