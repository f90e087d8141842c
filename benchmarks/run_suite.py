"""The reproduction suite of docs/RESULTS.md in one command: Table 2, the ablation, the teacher-weighting variants
and the lambda sweep, on the offline sentence-polarity data.

    python -m kdkit.polarity --out .data/polarity                       # once
    python recipes/bench/make_model.py                                   # once (run_suite does it too)
    nohup .venv/bin/python benchmarks/run_suite.py > runs/bench/suite.out 2>&1 &

Run from the repository root. Every step is an ordinary kdkit command on a recipe of recipes/bench/; teachers and
their logits are cached in .kdkit-cache/ and finished student runs are reused, so running this again resumes where
it stopped. While it runs:

* runs/bench/suite.log      every step's own output (progress bars included);
* runs/bench/suite.status   one line per step: started / done / failed, with wall time;
* runs/bench/table2.md|csv  Table 2 over the runs finished so far (rewritten after every step);
* runs/bench/unikd/ablate/ablation.{md,png}, runs/bench/unikd/sweep/sweep.{md,png}.

``--only table2,ablate,weighting,sweep`` picks steps; ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "recipes" / "bench"
OUT = ROOT / "runs" / "bench"
TABLE2 = ["kd-labeled", "aekd", "kd-unlabeled", "unikd"]
WEIGHTING = ["unikd-softmax-neg-loss", "unikd-as-printed"]
LAMBDAS = "0,1,5,10,15,20"


def kdkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdkit", *args]


def steps() -> list[tuple[str, str, list[str]]]:
    plan = [("table2", f"run {name}", kdkit("run", str(BENCH / f"{name}.toml"))) for name in TABLE2]
    plan.append(("ablate", "ablate unikd", kdkit("ablate", str(BENCH / "unikd.toml"))))
    plan += [("weighting", f"run {name}", kdkit("run", str(BENCH / f"{name}.toml"))) for name in WEIGHTING]
    plan.append(
        (
            "sweep",
            "sweep lambda",
            kdkit("sweep", str(BENCH / "unikd.toml"), "--set", f"plugins.unikd-disagreement.lambda={LAMBDAS}"),
        )
    )
    return plan


def report() -> None:
    """Table 2 over the finished runs (kd-labeled also holds the labels-only `single` row)."""
    names = TABLE2 + WEIGHTING
    finished = [str(OUT / n) for n in names if (OUT / n / "results.json").is_file()]
    if not finished:
        return
    command = kdkit("report", *finished, "--markdown", str(OUT / "table2.md"), "--csv", str(OUT / "table2.csv"))
    command += ["--json", str(OUT / "table2.json")]
    with open(OUT / "suite.log", "a", encoding="utf-8") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="table2,ablate,weighting,sweep", help="comma-separated steps to run")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        subprocess.run([sys.executable, str(BENCH / "make_model.py")], cwd=ROOT, check=True)
    # One thread per process: on a shared 2-core machine, two OpenMP threads that wait for each other while other
    # processes hold the cores made each step about 5x slower here (1.1 s against 0.2 s). Set them to override.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    status = OUT / "suite.status"
    started = time.time()
    failures = 0
    for group, label, command in steps():
        if group not in wanted:
            continue
        if args.dry_run:
            print(" ".join(command))
            continue
        tick = time.time()
        with open(status, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} started {label}\n")
        with open(OUT / "suite.log", "a", encoding="utf-8") as log:
            log.write(f"\n===== {label}: {' '.join(command)}\n")
            log.flush()
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        state = "done" if code == 0 else f"FAILED (exit {code})"
        failures += code != 0
        with open(status, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {state} {label} ({time.time() - tick:.0f} s)\n")
        report()
    if not args.dry_run:
        with open(status, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} suite finished: {failures} failed, {time.time() - started:.0f} s\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
