"""(f) How each cost grows: with the number of teachers N, the dataset size and the number of classes C; and
(g) the whole pipeline at scale (issue 12).

(f), ``python -m benchmarks.bench_scale``:

* the loss (forward + backward from the logits, hooks included) for UniKD and AE-KD: N = 2 .. 64, C = 2 .. 1000,
  batch 8 .. 512 (the student step around it does not depend on N and hardly on C: a [hidden, C] head);
* the cache build per sentence for 1 teacher at growing dataset sizes (it is linear in N: one pass per teacher);
* the cache on disk and in memory: rows x N x C float32.

(g), ``python -m benchmarks.bench_scale pipeline --rows 2000 20000 200000``: ``kdkit``'s own pipeline (each run a
fresh process, as ``kdkit run``) on synthetic sentence pairs (QQP-like: two columns of ~11 vocabulary words), tiny
models (a random BERT, hidden 64, 2 layers, MiniLM's WordPiece tokenizer), five teachers (the paper's ensemble):

* per stage: wall time and the peak resident memory the stage adds (``VmHWM`` reset at each stage's start), cold
  (empty cache) and fully cached (the same run again);
* the share of a cold teacher-output stage spent tokenizing and fingerprinting;
* two processes (``torchrun``, gloo, CPU, one thread each) against one (one thread) on the same machine, side by
  side in alternating order: the cold teacher-output stage (teachers cached), and the teacher stage (five
  teachers: two trained alone in each process and one with DDP, against all five in one process).

Targets (issue 12), printed as measured: a fully cached rerun at 200k rows spends at most 3 s in the pipeline
beyond start-up; the teacher-output stage adds at most 500 bytes per training row at 200k rows; tokenization and
data handling take at most 15% of a cold teacher-output stage; with 2 processes the teacher-output stage takes at
most 0.6x the time of one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_cache, bench_loss, common
from benchmarks import models as bench_models
from benchmarks.common import Report, Sizes

LOSSES = {
    "CE only": None,
    "unikd": {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}},
    "aekd": {"aekd": {}},
}


def loss_times(batch: int, teachers: int, classes: int, rounds: int, calls: int) -> dict[str, float]:
    student, teacher, labels = bench_loss.make_logits(batch, teachers, classes, seed=teachers * 1000 + classes)
    variants: dict[str, Callable[[], Any]] = {}
    for name, plugins in LOSSES.items():
        fn = bench_loss.ce_loss_fn if plugins is None else bench_loss.kdkit_loss_fn(plugins)
        variants[name] = bench_loss.loss_block(fn, student, teacher, labels, calls)
    samples = common.interleave(variants, rounds)
    return {name: statistics.median(t for r in rounds_ for t in r) for name, rounds_ in samples.items()}


def run(sizes: Sizes, step_seconds: float | None = None) -> Report:
    report = Report("scale", "(f) Scale: growth with teachers, dataset size and classes")
    rounds = 3 if sizes.quick else 7
    calls = 10 if sizes.quick else 30
    if step_seconds is None:
        step = bench_loss.student_step_fn(sizes, 2)
        step()
        step_seconds = statistics.median(step() + step())
    grid: list[tuple[str, int, int, int]] = []
    for n in (2, 5, 10, 20, 64):
        grid.append(("N", sizes.batch, n, sizes.classes))
    for c in (10, 100, 1000):
        grid.append(("C", sizes.batch, sizes.teachers, c))
    for b in (8, 128, 512):
        grid.append(("B", b, sizes.teachers, sizes.classes))
    body = []
    for what, b, n, c in grid:
        times = loss_times(b, n, c, rounds, calls)
        report.data.setdefault("loss", []).append({"vary": what, "batch": b, "teachers": n, "classes": c, **times})
        body.append(
            [
                what,
                b,
                n,
                c,
                common.fmt_time(times["CE only"]),
                common.fmt_time(times["unikd"]),
                common.fmt_time(times["aekd"]),
                f"{max(times['unikd'], times['aekd']) / step_seconds * 100:.2f}%",
            ]
        )
    report.add(
        f"Loss, forward + backward from the logits with hook dispatch (median of {rounds} rounds x {calls} calls), "
        f"batches half labeled / half unlabeled; last column: the slower of the two as a share of one student step "
        f"({common.fmt_time(step_seconds)}, MiniLM-3 batch {sizes.batch}; at batch 512 the real step would be "
        "~16x longer, so the share there is an overstatement).\n\n"
        + common.markdown_table(
            ["varied", "batch", "N", "C", "CE only", "unikd (both)", "aekd", "share of a step (max)"], body
        )
    )

    # cache build vs dataset size (1 teacher), and what the cache weighs
    counts = (64, 128, 256) if sizes.quick else (250, 500, 1000, 2000)
    refs = bench_models.teacher_checkpoints(1, sizes.classes)
    texts, labels, source = common.sentences(max(counts), seed=7)
    rows = []
    for count in counts:
        ds = bench_models.dataset(texts[:count], labels[:count])
        times = []
        for _ in range(1 if sizes.quick else 2):
            start = common.now()
            bench_cache.kdkit_build(refs, ds, sizes.classes, sizes.seq, sizes.cache_batch)
            times.append(common.now() - start)
        t = min(times)
        rows.append([count, common.fmt_time(t), common.fmt_time(t / count)])
        report.data.setdefault("cache_size", []).append({"samples": count, "seconds": t})
    report.add(
        f"Cache build for one MiniLM-L6 teacher vs dataset size ({source}; best of the repeats): linear in the "
        f"number of sentences (and in N: one pass per teacher; the head's C does not matter).\n\n"
        + common.markdown_table(["sentences", "build", "per sentence"], rows)
    )
    mem_rows = []
    for rows_, n, c in ((3000, 5, 2), (363_846, 5, 2), (392_702, 5, 3), (3000, 64, 1000)):
        size = rows_ * n * c * 4
        mem_rows.append([f"{rows_:,}", n, c, f"{size / 2**20:.2f} MiB"])
    tensor = torch.zeros(3000, 5, 2)
    assert tensor.numel() * tensor.element_size() == 3000 * 5 * 2 * 4
    report.add(
        "Teacher logits held by the student stage (float32 rows x N x C, the whole cache; on disk the same plus "
        "a small safetensors header per file). QQP train is 363,846 rows, MNLI 392,702:\n\n"
        + common.markdown_table(["rows", "N", "C", "size"], mem_rows)
    )
    return report


# --------------------------------------------------------------------------- (g) the pipeline at scale
STAGES = ("data", "teachers", "teacher_logits", "students", "evaluation")
#: Where a child stops (after this stage), and the stage function of kdkit.stages.run it patches to stop.
_NEXT = {"teachers": "teacher_outputs", "teacher_logits": "run_students", "students": "evaluate"}
_WRAPPED = {"load_data": "data", "prepare_teachers": "teachers", "teacher_outputs": "teacher_logits",
            "run_students": "students", "evaluate": "evaluation"}
#: What counts as tokenization and data handling inside the teacher-output stage.
_DATA_WORK = ("tokenized", "split_fingerprint", "tokenizer_fingerprint")


class _Stop(Exception):
    """Raised in place of the stage after ``--stop-after``."""


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Make ``VmHWM`` start again from the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def child_main(recipe_file: str, out: str, stop_after: str | None) -> None:
    """One ``kdkit run`` with each stage timed and its memory measured; writes ``<out>.rank<r>.json``."""
    import os

    import kdkit.stages.run as run
    import kdkit.tasks.logit_cache as logit_cache
    from kdkit.recipe import validate_recipe

    figures: dict[str, Any] = {"stages": {}, "data_work": 0.0}
    active = {"stage": ""}

    def timed_stage(name: str, stage: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            active["stage"] = stage
            _reset_peak()
            start_kb, tick, cpu = _status_kb("VmRSS"), time.perf_counter(), time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                figures["stages"][stage] = {
                    "seconds": time.perf_counter() - tick, "cpu_seconds": time.process_time() - cpu,
                    "rss_start_mb": start_kb / 1024,
                    "added_mb": (_status_kb("VmHWM") - start_kb) / 1024,
                }
        return wrapper

    def data_work(real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tick = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if active["stage"] == "teacher_logits":
                    figures["data_work"] += time.perf_counter() - tick
        return wrapper

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise _Stop

    for name, stage in _WRAPPED.items():
        real = stop if stop_after and name == _NEXT.get(stop_after) else getattr(run, name)
        setattr(run, name, timed_stage(name, stage, real))
    for name in _DATA_WORK:
        setattr(logit_cache, name, data_work(getattr(logit_cache, name)))
    recipe = validate_recipe(json.loads(Path(recipe_file).read_text()))
    tick = time.perf_counter()
    try:
        run.run_pipeline(recipe, console=None)
    except _Stop:
        figures["stages"].pop(_WRAPPED[_NEXT[stop_after]], None)  # type: ignore[index]
    figures["pipeline_seconds"] = time.perf_counter() - tick
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(figures))


def _write_pairs(path: Path, rows: int, seed: int) -> None:
    """``rows`` QQP-like rows (question1, question2: 3-40 vocabulary words, ~11 on average; label 0/1), parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = np.array(common._vocab_words())
    rng = np.random.default_rng(seed)
    columns = {}
    for name in ("question1", "question2"):
        lengths = np.clip(rng.normal(11, 5, rows).round().astype(int), 3, 40)
        picks = words[rng.integers(0, len(words), int(lengths.sum()))]
        ends = np.cumsum(lengths)
        columns[name] = [" ".join(picks[e - n : e]) + "?" for e, n in zip(ends, lengths)]
    columns["label"] = rng.integers(0, 2, rows).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _tiny_model(directory: Path) -> Path:
    """A random BERT (hidden 64, 2 layers) with MiniLM's WordPiece tokenizer."""
    if (directory / "config.json").exists():
        return directory
    from transformers import BertConfig, BertModel

    tok = common.tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def _recipe(root: Path, model: Path, rows: int, teacher_steps: int) -> Path:
    recipe = {
        "name": f"scale-{rows}", "seeds": [1], "output_dir": str(root / "runs"), "cache_dir": str(root / "cache"),
        "data": {"files": {"train": str(root / "train.parquet"), "validation": str(root / "dev.parquet")},
                 "text": ["question1", "question2"], "labeled_fraction": 0.5, "tune_fraction": 0.1,
                 "max_length": 64},
        "teachers": {"model": str(model), "seeds": [1, 2, 3, 4, 5], "learning_rate": 1e-3, "batch_size": 32,
                     "max_steps": teacher_steps, "eval_batch_size": 256, "logging_steps": 1000},
        "student": {"model": str(model), "num_layers": 1, "learning_rate": 1e-3, "batch_size": 32, "max_steps": 5,
                    "eval_batch_size": 256, "save_steps": 1000, "logging_steps": 1000},
    }
    path = root / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def _child(recipe: Path, processes: int = 1, stop_after: str | None = None, threads: int = 1) -> dict[str, Any]:
    """Run one child (``processes`` > 1: under torchrun); its figures (rank 0's) plus the process wall time."""
    import os
    import subprocess
    import sys

    out = recipe.parent / f"figures-{time.time_ns()}"
    args = ["-m", "benchmarks.bench_scale", "child", "--recipe", str(recipe), "--out", str(out)]
    if stop_after:
        args += ["--stop-after", stop_after]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=common.REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    figures = json.loads(Path(f"{out}.rank0.json").read_text())
    figures["process_seconds"] = wall
    figures["startup_seconds"] = wall - figures["pipeline_seconds"]
    return figures


def _forget(root: Path, *parts: str) -> None:
    import shutil

    for part in parts:
        shutil.rmtree(root / part, ignore_errors=True)


def _size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.exists() else 0


def pipeline_sizes(root: Path, model: Path, rows: int) -> dict[str, Any]:
    """Cold and fully cached runs at one size; a table row per stage."""
    common.log(f"  {rows:,} rows: writing data")
    _write_pairs(root / "train.parquet", rows, seed=rows)
    _write_pairs(root / "dev.parquet", min(rows // 10, 40_000), seed=rows + 1)
    recipe = _recipe(root, model, rows, teacher_steps=5)
    common.log(f"  {rows:,} rows: cold run")
    cold = _child(recipe)
    common.log(f"  {rows:,} rows: fully cached run")
    cached = _child(recipe)
    tokens = _size_of(root / "cache" / "tokens")
    return {"rows": rows, "cold": cold, "cached": cached, "token_bytes": tokens}


def parallel(root: Path, rows: int, rounds: int, teacher_steps: int = 300) -> dict[str, list[float]]:
    """Two processes against one, side by side in alternating order: the cold teacher-output stage (teachers
    cached) and the teacher stage (five teachers: two alone in each process and one with DDP, against all five in
    one process)."""
    recipe = root / "recipe.json"
    times: dict[str, list[float]] = {
        f"{what}-{n}{cpu}": [] for what in ("outputs", "teachers") for n in (1, 2) for cpu in ("", "-cpu")
    }
    for r in range(rounds):
        for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
            _forget(root / "cache", "logits", "tokens")
            figures = _child(recipe, processes, stop_after="teacher_logits")
            times[f"outputs-{processes}"].append(figures["stages"]["teacher_logits"]["seconds"])
            times[f"outputs-{processes}-cpu"].append(figures["stages"]["teacher_logits"]["cpu_seconds"])
            common.log(f"    round {r + 1}: teacher outputs, {processes} process(es): "
                       f"{times[f'outputs-{processes}'][-1]:.1f} s")
    teacher_recipe = _recipe(root, root / "model", rows, teacher_steps=teacher_steps)
    for r in range(rounds):
        for processes in ((1, 2) if r % 2 == 0 else (2, 1)):
            _forget(root / "cache", "teachers")
            figures = _child(teacher_recipe, processes, stop_after="teachers")
            times[f"teachers-{processes}"].append(figures["stages"]["teachers"]["seconds"])
            times[f"teachers-{processes}-cpu"].append(figures["stages"]["teachers"]["cpu_seconds"])
            common.log(f"    round {r + 1}: teachers, {processes} process(es): {times[f'teachers-{processes}'][-1]:.1f} s")
    return times


def pipeline_run(rows_list: list[int], parallel_rows: int | None, rounds: int) -> Report:
    import tempfile

    report = Report("pipeline-scale", "(g) The pipeline at scale: stages, memory, two processes")
    base = Path(tempfile.mkdtemp(prefix="kdkit-scale-"))
    model = _tiny_model(base / "model")
    measured = []
    for rows in rows_list:
        root = base / f"rows-{rows}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "model").symlink_to(model)
        measured.append(pipeline_sizes(root, root / "model", rows))
    report.data["sizes"] = measured
    report.add(_stage_table(measured))
    speed = None
    if parallel_rows:
        root = base / f"rows-{parallel_rows}"
        if not (root / "recipe.json").exists():
            raise SystemExit(f"--parallel-rows {parallel_rows} must be one of --rows")
        common.log(f"  two processes against one at {parallel_rows:,} rows")
        speed = parallel(root, parallel_rows, rounds)
        report.data["parallel"] = {"rows": parallel_rows, "seconds": speed}
        report.add(_parallel_table(speed, parallel_rows))
    report.add(_targets(measured, speed))
    return report


def _stage_table(measured: list[dict[str, Any]]) -> str:
    body = []
    for m in measured:
        for kind in ("cold", "cached"):
            f = m[kind]
            cells = [f"{m['rows']:,}", kind, f"{f['startup_seconds']:.1f} s", f"{f['pipeline_seconds']:.2f} s"]
            for stage in STAGES:
                st = f["stages"].get(stage)
                cells.append(f"{st['seconds']:.2f} s / +{st['added_mb']:.0f} MB" if st else "")
            body.append(cells)
    return (
        "Per stage: wall time / peak resident memory the stage adds above its start (MB). Start-up: the process's "
        "wall time outside the pipeline (interpreter, imports, exit). Cold: empty cache (the teachers train 5 steps "
        "each); cached: the same recipe again.\n\n"
        + common.markdown_table(["rows", "run", "start-up", "pipeline", *STAGES], body)
        + "\n\nTokens on disk: "
        + ", ".join(f"{m['rows']:,} rows: {m['token_bytes'] / 2**20:.1f} MiB" for m in measured)
    )


def _parallel_table(speed: dict[str, list[float]], rows: int) -> str:
    body = []
    for what, label in (("outputs", "teacher outputs, cold (5 teachers)"), ("teachers", "teachers (5, 300 steps each)")):
        cells = [label]
        for cpu in ("", "-cpu"):
            one, two = speed[f"{what}-1{cpu}"], speed[f"{what}-2{cpu}"]
            ratios = [b / a for a, b in zip(one, two)]
            cells += [f"{statistics.median(one):.1f} s", f"{statistics.median(two):.1f} s",
                      f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"]
        body.append(cells)
    return (
        f"Two processes (torchrun, gloo, one thread each) against one process (one thread), {rows:,} rows, "
        f"{len(speed['outputs-1'])} alternating rounds; ratio: two over one, round by round (median, min-max). "
        "Wall: the stage's wall time in rank 0; CPU: the CPU time rank 0 spent in it (what a process does itself, "
        "whatever else runs on the machine).\n\n"
        + common.markdown_table(
            ["stage", "wall, 1 process", "wall, 2 processes", "wall ratio", "CPU, 1 process", "CPU, rank 0 of 2",
             "CPU ratio"], body)
    )


def _targets(measured: list[dict[str, Any]], speed: dict[str, list[float]] | None) -> str:
    at = next((m for m in measured if m["rows"] == 200_000), measured[-1])
    rows = at["rows"]
    cold_out = at["cold"]["stages"]["teacher_logits"]
    lines = [
        f"- fully cached rerun at {rows:,} rows, pipeline beyond start-up: {at['cached']['pipeline_seconds']:.2f} s "
        "(target <= 3 s)",
        f"- teacher-output stage, memory added per training row at {rows:,} rows: "
        f"{cold_out['added_mb'] * 2**20 / rows:.0f} bytes cold, "
        f"{at['cached']['stages']['teacher_logits']['added_mb'] * 2**20 / rows:.0f} bytes cached (target <= 500)",
        f"- tokenization and data handling in a cold teacher-output stage at {rows:,} rows: "
        f"{at['cold']['data_work']:.2f} s of {cold_out['seconds']:.2f} s = "
        f"{100 * at['cold']['data_work'] / cold_out['seconds']:.1f}% (target <= 15%)",
    ]
    if speed:
        ratios = [b / a for a, b in zip(speed["outputs-1"], speed["outputs-2"])]
        cpu = [b / a for a, b in zip(speed["outputs-1-cpu"], speed["outputs-2-cpu"])]
        lines.append(f"- teacher-output stage, 2 processes over 1: {statistics.median(ratios):.2f}x wall time "
                     f"(target <= 0.6x); rank 0's CPU time {statistics.median(cpu):.2f}x")
    return "Targets (issue 12), as measured:\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["child"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--recipe", required=True)
        parser.add_argument("--out", required=True)
        parser.add_argument("--stop-after", choices=sorted(_NEXT))
        ns = parser.parse_args(args[1:])
        child_main(ns.recipe, ns.out, ns.stop_after)
        return
    if args[:1] == ["pipeline"]:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20_000, 200_000])
        parser.add_argument("--parallel-rows", type=int, default=200_000, help="0: no two-process comparison")
        parser.add_argument("--rounds", type=int, default=2)
        ns = parser.parse_args(args[1:])
        common.quiet_transformers()
        pipeline_run(ns.rows, ns.parallel_rows or None, ns.rounds)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args(args)
    run(Sizes.quick_sizes() if ns.quick else Sizes())


if __name__ == "__main__":
    main()
