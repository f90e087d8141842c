"""The reproduction suite of docs/RESULTS.md in one command: Table 2 (two teacher settings), the ablation, the
teacher-weighting variants and the lambda sweep, on the offline sentence-polarity data with MiniLM.

    python -m kdkit.sources.polarity --out .data/polarity                 # once: the data
    mkdir -p runs/bench && nohup .venv/bin/python benchmarks/run_suite.py > runs/bench/suite.out 2>&1 &

Run from the repository root. Every step is an ordinary kdkit command on a recipe of recipes/bench/; teachers and
their logits are cached in .kdkit-cache/ and finished student runs are reused, so running this again resumes where
it stopped. While it runs:

* runs/bench/suite.log      every step's own output (progress bars included);
* runs/bench/suite.status   one line per step: started / done / failed, with wall time;
* runs/bench/table2.md|csv  Table 2 over the runs finished so far, one column per teacher setting (rewritten
                            after every step);
* runs/bench/unikd/ablate/ablation.{md,png}, runs/bench/unikd/sweep/sweep.{md,png}.

Steps, in this order (``--only`` picks some, comma-separated):

* ``table2``: ``kdkit run`` on recipes/bench/{kd-labeled,aekd,kd-unlabeled,unikd}.toml (teachers of the student's
  architecture, the paper's protocol; kd-labeled also trains the labels-only ``single`` row);
* ``strong``: the same four rows with deeper teachers, recipes/bench/strong/*.toml (outputs in runs/bench-strong/);
* ``ablate``: ``kdkit ablate recipes/bench/unikd.toml``;
* ``weighting``: ``kdkit run`` on the two other ``teacher_weighting`` variants of Eq. 1;
* ``sweep``: ``kdkit sweep recipes/bench/unikd.toml --set plugins.unikd-disagreement.lambda=0,1,5,10,15,20``;
* ``long``: UniKD and the labels-only student at 360 steps instead of 120 (``kdkit run recipes/bench/unikd.toml
  --set student.max_steps=360 --set student.label_only_baseline=true``, outputs in runs/bench-long/): does the
  comparison change when the students train longer?
* ``teachers``: how much the teachers of each column differ (reads the cached teacher logits, trains nothing):
  runs/bench/teachers.md;
* ``publish``: copy the tables and plots to docs/results/.

The labels-only student does not depend on the teachers: its run folder is named by a hash of its own settings
and seed, which are the same in recipes/bench/kd-labeled.toml and recipes/bench/strong/kd-labeled.toml. Before the
``strong`` kd-labeled run, the suite copies the finished labels-only runs of runs/bench/kd-labeled/ (their
``done.json`` and evaluation logits) into runs/bench-strong/kd-labeled/, where kdkit finds and reuses them (its
results.json marks them ``reused``) instead of training the same student twice. A copy whose hash does not match
is simply not used.

``--threads N`` (default 1) sets OMP_NUM_THREADS / MKL_NUM_THREADS for every step; ``--dry-run`` prints the plan.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "recipes" / "bench"
STRONG = BENCH / "strong"
OUT = ROOT / "runs" / "bench"
STRONG_OUT = ROOT / "runs" / "bench-strong"
DOCS = ROOT / "docs" / "results"
TABLE2 = ["kd-labeled", "aekd", "kd-unlabeled", "unikd"]
WEIGHTING = ["unikd-softmax-neg-loss", "unikd-as-printed"]
LAMBDAS = "0,1,5,10,15,20"
LONG_OUT = ROOT / "runs" / "bench-long"
LONG_STEPS = 360
GROUPS = ["table2", "strong", "ablate", "weighting", "sweep", "long", "teachers", "publish"]


def kdkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdkit", *args]


def rel(path: Path) -> str:
    """``path`` relative to the repository root, where every command runs (shorter logs and results.json)."""
    return str(path.relative_to(ROOT))


def share_labels_only(source: Path, target: Path) -> int:
    """Copy the finished labels-only student runs of run folder ``source`` into run folder ``target`` (the
    files kdkit reads to reuse a finished run: done.json and eval_logits.safetensors). Returns how many."""
    copied = 0
    for run in sorted((source / "students").glob("labels-only-seed*")):
        files = [run / "done.json", run / "eval_logits.safetensors"]
        dest = target / "students" / run.name
        if not all(f.is_file() for f in files) or dest.exists():
            continue
        staging = dest.with_name(dest.name + ".copying")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, staging / f.name)
        staging.rename(dest)
        copied += 1
    return copied


def steps() -> list[tuple[str, str, list[str]]]:
    plan = [("table2", f"run {name}", kdkit("run", rel(BENCH / f"{name}.toml"))) for name in TABLE2]
    plan += [("strong", f"run strong/{name}", kdkit("run", rel(STRONG / f"{name}.toml"))) for name in TABLE2]
    plan.append(("ablate", "ablate unikd", kdkit("ablate", rel(BENCH / "unikd.toml"))))
    plan += [("weighting", f"run {name}", kdkit("run", rel(BENCH / f"{name}.toml"))) for name in WEIGHTING]
    plan.append(
        (
            "sweep",
            "sweep lambda",
            kdkit("sweep", rel(BENCH / "unikd.toml"), "--set", f"plugins.unikd-disagreement.lambda={LAMBDAS}"),
        )
    )
    plan.append(
        (
            "long",
            f"run unikd and labels only, {LONG_STEPS} steps",
            kdkit(
                "run", rel(BENCH / "unikd.toml"), "--set", f"student.max_steps={LONG_STEPS}",
                "--set", "student.label_only_baseline=true", "--set", f'output_dir="{rel(LONG_OUT)}"',
            ),
        )
    )
    return plan


def finished_runs() -> list[Path]:
    """Run folders of Table 2 that hold a results.json: the main column first, then the stronger teachers."""
    names = [OUT / n for n in TABLE2 + WEIGHTING] + [STRONG_OUT / n for n in TABLE2]
    return [d for d in names if (d / "results.json").is_file()]


def report(log_path: Path) -> None:
    """Table 2 over the finished runs (kd-labeled also holds the labels-only `single` row); runs with the same
    teachers share a column, so the two teacher settings are two columns."""
    finished = finished_runs()
    if not finished:
        return
    command = kdkit("report", *map(rel, finished), "--markdown", rel(OUT / "table2.md"), "--csv", rel(OUT / "table2.csv"))
    command += ["--json", rel(OUT / "table2.json")]
    with open(log_path, "a", encoding="utf-8") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)


def teacher_diagnostics() -> str:
    """A Markdown table of how much each column's teachers differ, from their cached logits (nothing is trained:
    a column whose run has not finished is skipped). Per column: the teachers' mean accuracy, the ensemble's,
    the share of eval sentences that at least one teacher gets right (the ceiling of any weighting), the mean
    share of eval sentences on which two teachers disagree, and on the unlabeled half the mean pairwise KL
    disagreement L_p of UniKD Eq. 4 with the sample weight s = 1 + 10 L_p it gives (Eq. 5, lambda 10) computed by
    the unikd-disagreement plugin through kdkit's public DistillationLoss."""
    import torch

    from kdkit import DistillationLoss
    from kdkit.tasks.logit_cache import LogitCache
    from kdkit.data import load_splits
    from kdkit.recipe import load_recipe
    from kdkit.stages.teachers import prepare_teachers

    header = [
        "teachers", "mean teacher", "ensemble", "ensemble - mean", "any teacher right", "pairwise disagreement (eval)",
        "mean L_p (unlabeled)", "s = 1 + 10 L_p: mean / 90th pct / max",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    columns = [(BENCH / "unikd.toml", OUT / "unikd"), (STRONG / "unikd.toml", STRONG_OUT / "unikd")]
    for recipe_file, run_dir in columns:
        if not (run_dir / "results.json").is_file():
            continue
        recipe = load_recipe(recipe_file)
        splits = load_splits(recipe.data, need_unlabeled=True)
        teachers = prepare_teachers(
            recipe.teachers, cache_dir=recipe.cache_dir, labeled=splits.labeled, text_columns=list(splits.text_columns),
            label_names=list(splits.label_names), max_length=recipe.data.max_length,
        )
        if any(t.trained_now for t in teachers):
            raise RuntimeError(f"{recipe_file}: a teacher was not in the cache")
        logits = LogitCache(recipe.cache_dir, batch_size=recipe.teachers.eval_batch_size).teacher_logits(
            teachers, {"unlabeled": splits.unlabeled, "eval": splits.eval}, list(splits.text_columns),
            list(splits.label_names), max_length=recipe.data.max_length,
        )
        gold = torch.as_tensor(list(splits.eval["label"]))
        probs = torch.softmax(logits["eval"].double(), dim=-1)  # [rows, N, C]
        right = probs.argmax(-1) == gold[:, None]  # [rows, N]
        n = right.shape[1]
        ensemble = (probs.mean(1).argmax(-1) == gold).double().mean().item()
        preds = probs.argmax(-1)
        pairs = [(preds[:, i] != preds[:, j]).double().mean().item() for i in range(n) for j in range(i + 1, n)]
        unlabeled = logits["unlabeled"]
        loss = DistillationLoss.from_plugins({"unikd-disagreement": {"lambda": 10.0}}, on=["unlabeled"])
        weights = loss(
            torch.zeros(unlabeled.shape[0], unlabeled.shape[2]), unlabeled, torch.full((unlabeled.shape[0],), -100)
        ).sample_weights.double()
        mean_teacher = right.double().mean().item()
        cells = [
            f"{n} x {recipe.teachers.num_layers}-layer MiniLM", f"{100 * mean_teacher:.2f}", f"{100 * ensemble:.2f}",
            f"{100 * (ensemble - mean_teacher):+.2f}", f"{100 * right.any(1).double().mean().item():.2f}",
            f"{100 * sum(pairs) / len(pairs):.2f} %", f"{((weights - 1) / 10).mean().item():.4f}",
            f"{weights.mean().item():.2f} / {torch.quantile(weights, 0.9).item():.2f} / {weights.max().item():.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (OUT / "teachers.md").write_text(text, encoding="utf-8")
    return text


def publish() -> list[Path]:
    """Copy the suite's tables and plots (not the runs) to docs/results/."""
    DOCS.mkdir(parents=True, exist_ok=True)
    sources = [OUT / f"table2.{ext}" for ext in ("md", "csv", "json")] + [OUT / "teachers.md"]
    sources += [OUT / "unikd" / "ablate" / f"ablation.{ext}" for ext in ("md", "csv", "json", "png")]
    sources += [OUT / "unikd" / "sweep" / f"sweep.{ext}" for ext in ("md", "csv", "json", "png")]
    copied = []
    for src in sources:
        if src.is_file():
            shutil.copy2(src, DOCS / src.name)
            copied.append(DOCS / src.name)
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated steps among {', '.join(GROUPS)}")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every step (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    os.chdir(ROOT)  # recipes name their data, outputs and cache relative to the repository root
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = wanted - set(GROUPS)
    if unknown:
        parser.error(f"unknown step(s) {', '.join(sorted(unknown))}; choose among {', '.join(GROUPS)}")
    # One thread per process: on a shared 2-core machine, two OpenMP threads that wait for each other while other
    # processes hold the cores made each step about 5x slower (1.1 s against 0.2 s in the first run of the suite).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.dry_run:
        for group, _, command in steps():
            if group in wanted:
                print(" ".join(command))
        if "teachers" in wanted:
            print("teacher diagnostics from the cached logits -> runs/bench/teachers.md")
        if "publish" in wanted:
            print(f"copy tables and plots to {DOCS.relative_to(ROOT)}/")
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    status, log_path = OUT / "suite.status", OUT / "suite.log"

    def note(text: str) -> None:
        with open(status, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC {text}\n")

    started = time.time()
    failures = 0
    note(f"suite started: steps {','.join(g for g in GROUPS if g in wanted)}, {args.threads} thread(s)")
    for group, label, command in steps():
        if group not in wanted:
            continue
        if label == "run strong/kd-labeled":
            shared = share_labels_only(OUT / "kd-labeled", STRONG_OUT / "kd-labeled")
            if shared:
                note(f"copied {shared} finished labels-only student run(s) from runs/bench/kd-labeled")
        tick = time.time()
        note(f"started {label}")
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== {label}: {' '.join(command)}\n")
            log.flush()
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        failures += code != 0
        note(f"{'done' if code == 0 else f'FAILED (exit {code})'} {label} ({time.time() - tick:.0f} s)")
        report(log_path)
    if "teachers" in wanted:
        try:
            teacher_diagnostics()
            note("teacher diagnostics: runs/bench/teachers.md")
        except Exception as exc:  # a diagnostic must not hide the suite's results
            failures += 1
            note(f"FAILED teacher diagnostics: {exc!r}")
    if "publish" in wanted:
        copied = publish()
        note(f"published {len(copied)} file(s) to {DOCS.relative_to(ROOT)}/")
    note(f"suite finished: {failures} failed, {time.time() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
