"""The experiment suite of docs/RESULTS.md (issue 15): Table 2, UniKD's ablation, the lambda sweep and the amount of
unlabeled data, on two offline data sets, with early stopping on the tune split as the primary protocol and equal
steps as the control. Every step is an ordinary ``kdkit`` command on a recipe of recipes/suite/.

    python -m kdkit.sources.vader --domain movies --out .data/vader-movies      # once: the data
    python -m kdkit.sources.rotten_tomatoes --out .data/rotten-tomatoes
    mkdir -p runs/suite && nohup .venv/bin/python benchmarks/run_experiments.py > runs/suite/suite.out 2>&1 &

Run from the repository root. Teachers and their logits are cached in .kdkit-cache/ and finished student runs are
reused, so running this again resumes where it stopped. ``--workers 2`` (the default) runs two steps at once, each
on one thread (a 2-core machine: one core each); ``--only GROUP,...`` picks groups (or single steps by name) and
queues them in the order given; ``--data vader`` (or ``rt``) keeps one data set's steps of the groups named;
``--dry-run`` prints the plan.

Outputs: runs/suite/logs/<step>.log (each step's own output), runs/suite/status.tsv (started / done / failed, wall
time), and after every step the reports of the runs finished so far (``kdkit report``):
runs/suite/report-<data>-<protocol>.{md,csv,json} (Table 2), report-<data>-ablate.* and report-<data>-sweep.*
(UniKD's ablation and lambda sweep, each beside the Table 2 UniKD row: the recipe as written, lambda 10), and
report-vader-unlabeled.*.

Steps, in the order they are queued: ``table2`` (both data sets, early stopping); ``equal`` on the movie snippets
(table2 at 200 equal steps, no evaluation: the cheapest); ``unlabeled`` (the movie snippets: KD-Unlabeled and
UniKD with 1,000 and 2,000 unlabeled sentences; the full ~4,200 are the table2 rows); ``ablate`` and ``sweep``
(lambda 0, 1, 5, 20) on the movie snippets, then on the three-class set; ``equal`` on the three-class set.

The ablation and the sweep are queued one variant (eight seeds) a step, so that both workers share them: each step
is the ``kdkit run`` that ``kdkit ablate`` / ``kdkit sweep`` would make for that variant (the same recipe, the
same folder, runs/suite/<data>/unikd/ablate/<variant>/ and .../sweep/<key>=<value>/), so either command, run
afterwards, finds those runs finished and only draws its table and plot. The recipe as written (lambda 10) is not
run again: it is the Table 2 UniKD row, the same recipe and seeds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "recipes" / "suite"
OUT = ROOT / "runs" / "suite"
DATASETS = ["vader", "rt"]
ROWS = ["kd-labeled", "unikd", "kd-unlabeled", "aekd"]
EARLY = 'student.early_stopping={eval_steps = 25, patience = 4, metric = "accuracy"}'
EARLY_SETS = ["--set", EARLY, "--set", "student.max_steps=600"]
#: UniKD's ablation as ``kdkit ablate`` makes it: each enabled plugin switched off, then KD on one stream only
ABLATION = {
    "without-unikd-correctness": ["plugins.unikd-correctness.enabled=false"],
    "without-unikd-disagreement": ["plugins.unikd-disagreement.enabled=false"],
    "on-labeled": ['distill.on=["labeled"]'],
    "on-unlabeled": ['distill.on=["unlabeled"]'],
}
LAMBDA_KEY = "plugins.unikd-disagreement.lambda"
LAMBDAS = [0, 1, 5, 20]  # and 10, the recipe's own value: the Table 2 UniKD row
UNLABELED = [1000, 2000]
GROUPS = ["table2", "unlabeled", "ablate", "sweep", "equal"]


@dataclass
class Step:
    name: str
    group: str
    args: list[str]


def plan() -> list[Step]:
    """The steps in the order they are queued: what the reading of docs/RESULTS.md needs most comes first."""
    steps = []
    for data in DATASETS:
        for row in ROWS:
            extra = ["--set", "student.label_only_baseline=true"] if row == "kd-labeled" else []
            steps.append(Step(f"{data}-{row}-early", "table2", ["run", f"recipes/suite/{data}/{row}.toml", *EARLY_SETS, *extra]))
    # the equal-steps control of the movie snippets (cheap: no evaluation), before the longer groups
    for data in ["vader"]:
        for row in ROWS:
            extra = ["--set", "student.label_only_baseline=true"] if row == "kd-labeled" else []
            sets = ["--set", f"output_dir=runs/suite/{data}-equal", *extra]
            steps.append(Step(f"{data}-{row}-equal", "equal", ["run", f"recipes/suite/{data}/{row}.toml", *sets]))
    for size in UNLABELED:
        for row in ("kd-unlabeled", "unikd"):
            sets = [*EARLY_SETS, "--set", f"data.max_unlabeled_samples={size}", "--set", f"name={row}-u{size}",
                    "--set", "output_dir=runs/suite/vader-unlabeled"]
            steps.append(Step(f"vader-{row}-u{size}", "unlabeled", ["run", f"recipes/suite/vader/{row}.toml", *sets]))
    for data in DATASETS:
        steps += _ablation_and_sweep(data)
    for data in ["rt"]:
        for row in ROWS:
            extra = ["--set", "student.label_only_baseline=true"] if row == "kd-labeled" else []
            sets = ["--set", f"output_dir=runs/suite/{data}-equal", *extra]
            steps.append(Step(f"{data}-{row}-equal", "equal", ["run", f"recipes/suite/{data}/{row}.toml", *sets]))
    return steps


def _ablation_and_sweep(data: str) -> list[Step]:
    """UniKD's ablation and lambda sweep on ``data``, one variant a step (see the module's docstring)."""
    recipe, folder = f"recipes/suite/{data}/unikd.toml", f"runs/suite/{data}/unikd"
    steps = []
    for slug, overrides in ABLATION.items():
        sets = [arg for o in overrides for arg in ("--set", o)]
        where = ["--set", f"output_dir={folder}/ablate", "--set", f"name={slug}"]
        steps.append(Step(f"{data}-ablate-{slug}", "ablate", ["run", recipe, *EARLY_SETS, *sets, *where]))
    for value in LAMBDAS:
        sets = ["--set", f"{LAMBDA_KEY}={value}", "--set", f"output_dir={folder}/sweep", "--set", f"name={LAMBDA_KEY}={value}"]
        steps.append(Step(f"{data}-lambda-{value}", "sweep", ["run", recipe, *EARLY_SETS, *sets]))
    return steps


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


_status_lock = threading.Lock()


def _status(line: str) -> None:
    with _status_lock, (OUT / "status.tsv").open("a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{line}\n")


def _run(step: Step) -> bool:
    log = OUT / "logs" / f"{step.name}.log"
    _status(f"{step.name}\tstarted")
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ kdkit {' '.join(step.args)}\n")
        fh.flush()
        done = subprocess.run([sys.executable, "-m", "kdkit", *step.args], cwd=ROOT, env=_env(), stdout=fh,
                              stderr=subprocess.STDOUT, check=False)
    state = "done" if done.returncode == 0 else f"failed (exit {done.returncode})"
    _status(f"{step.name}\t{state}\t{time.perf_counter() - start:.0f} s")
    return done.returncode == 0


def _report(runs: list[Path], stem: str) -> None:
    runs = [r for r in runs if (r / "results.json").is_file()]
    if not runs:
        return
    out = OUT / stem
    args = ["report", *map(str, runs), "--markdown", f"{out}.md", "--csv", f"{out}.csv", "--json", f"{out}.json"]
    subprocess.run([sys.executable, "-m", "kdkit", *args], cwd=ROOT, env=_env(), capture_output=True, check=False)


def report() -> None:
    """The reports of every data set, protocol and experiment over the runs finished so far."""
    for data in DATASETS:
        for protocol, folder in (("early", data), ("equal", f"{data}-equal")):
            _report([OUT / folder / row for row in ROWS], f"report-{data}-{protocol}")
        unikd = OUT / data / "unikd"
        # the recipe as written (lambda 10, every plugin on, both streams): the Table 2 UniKD row, or the same runs
        # made by `kdkit ablate` when that row's folder is gone
        written = next((r for r in (unikd, unikd / "ablate" / "as-written") if (r / "results.json").is_file()), unikd)
        _report([written, *(unikd / "ablate" / slug for slug in ABLATION)], f"report-{data}-ablate")
        _report([*(unikd / "sweep" / f"{LAMBDA_KEY}={v}" for v in LAMBDAS), written], f"report-{data}-sweep")
    unlabeled = [OUT / "vader-unlabeled" / f"{row}-u{size}" for size in UNLABELED for row in ("kd-unlabeled", "unikd")]
    _report(unlabeled + [OUT / "vader" / row for row in ("kd-unlabeled", "unikd")], "report-vader-unlabeled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default=",".join(GROUPS), help="groups or step names, queued in this order")
    parser.add_argument("--data", default=",".join(DATASETS), help="data sets whose steps are kept")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    items, datasets = args.only.split(","), args.data.split(",")
    names = [s.name for s in plan()]
    unknown = sorted(set(items) - set(GROUPS) - set(names)) + sorted(set(datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown group, step or data set: {', '.join(unknown)} (groups: {', '.join(GROUPS)}; "
                     f"data sets: {', '.join(DATASETS)}; steps: --dry-run lists them)")
    # queued in the order asked for: a group's steps in the plan's order, a step by its name
    steps = []
    for item in items:
        chosen = [s for s in plan() if s.name == item or (s.group == item and s.name.split("-")[0] in datasets)]
        steps += [s for s in chosen if s not in steps]
    if args.dry_run:
        for step in steps:
            print(f"{step.name:28} kdkit {' '.join(step.args)}")
        return
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    queue = list(steps)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                step = queue.pop(0)
            _run(step)
            with lock:
                report()

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
        time.sleep(30)  # the first step starts the teachers; the second then waits on their lock, not a race
    for thread in threads:
        thread.join()
    _status("suite finished")


if __name__ == "__main__":
    main()
