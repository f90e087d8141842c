"""Run every kdkit benchmark and write one report (markdown + JSON).

    python -m benchmarks.run_all --quick            # smoke run of every benchmark (a few minutes)
    python -m benchmarks.run_all                    # the real sizes (tens of minutes on 2 CPU cores)
    python -m benchmarks.run_all --only step cache  # some of them

Real sizes (the issue's): student MiniLM cut to 3 layers, 5 MiniLM-L6 teachers, batch 32, max_length 48,
3,000 sentences, 3 epochs, cache batch 256. Every size can be changed on the command line. The report goes to
``benchmarks/results/<name>.md`` and ``.json`` (``--name``, default ``latest`` or ``quick``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/run_all.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import Sizes  # noqa: E402

ORDER = ("loss", "step", "cache", "memory", "scale", "e2e", "pipeline")


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds: a smoke run")
    parser.add_argument("--only", nargs="+", choices=ORDER, help="run only these benchmarks")
    parser.add_argument("--name", help="report file name under benchmarks/results/")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of the student-step benchmark (default 8)")
    parser.add_argument("--steps", type=int, help="timed steps per round of the student-step benchmark (default 4)")
    parser.add_argument("--samples", type=int, help="sentences for the cache build and end to end")
    parser.add_argument("--epochs", type=int, help="epochs end to end")
    parser.add_argument("--teachers", type=int, help="number of teachers")
    parser.add_argument("--cache-batch", type=int, help="batch size of the teacher passes")
    parser.add_argument("--cache-rounds", type=int, help="rounds of the cache-build benchmark (default 3)")
    parser.add_argument("--e2e-rounds", type=int, help="rounds of the end-to-end benchmark (default 1)")
    parser.add_argument("--memory-rounds", type=int, help="rounds of the memory benchmark (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's own, one per core); on a machine shared with other jobs, 1 "
        "gives far steadier timings (docs/PERFORMANCE.md)",
    )
    parser.add_argument(
        "--pipeline-rows", type=int, nargs="+", help="training rows of the pipeline benchmark (default 2000 20000 200000)"
    )
    parser.add_argument(
        "--parallel-rows", type=int, help="rows of its two-process comparison (default 200000; 0: none)"
    )
    parser.add_argument("--pipeline-rounds", type=int, help="alternating rounds of that comparison (default 2)")
    parser.add_argument("--no-textbrewer", action="store_true", help="leave TextBrewer out of the end to end")
    parser.add_argument("--no-ablation", action="store_true", help="leave the 5-variant ablation out")
    parser.add_argument(
        "--e2e-sides",
        nargs="+",
        choices=("naive", "kdkit", "textbrewer", "textbrewer-cached"),
        help="sides of the end-to-end table, in this order (default: naive kdkit textbrewer)",
    )
    args = parser.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # memory children
    sizes = Sizes.quick_sizes() if args.quick else Sizes()
    for attr, value in (
        ("rounds", args.rounds),
        ("steps", args.steps),
        ("samples", args.samples),
        ("epochs", args.epochs),
        ("teachers", args.teachers),
        ("cache_batch", args.cache_batch),
    ):
        if value:
            setattr(sizes, attr, value)
    chosen = [b for b in ORDER if args.only is None or b in args.only]
    name = args.name or ("quick" if args.quick else "latest")
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md_path = common.RESULTS_DIR / f"{name}.md"
    json_path = common.RESULTS_DIR / f"{name}.json"

    started = dt.datetime.now(dt.timezone.utc)
    info: dict[str, Any] = {
        "command": "python -m benchmarks.run_all " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "machine": common.machine(),
        "sizes": sizes.as_dict(),
        "benchmarks": {},
    }
    sections: list[str] = []

    def write() -> None:
        head = [
            f"# kdkit benchmarks ({name})",
            "",
            f"- command: `{info['command'].strip()}`",
            f"- started: {info['started']}",
            f"- machine: {info['machine'].get('cpu', '?')}, {info['machine']['cpus']} CPUs, torch "
            f"{info['machine']['torch']} ({info['machine']['threads']} threads), transformers "
            f"{info['machine'].get('transformers', '?')}, CUDA: {info['machine']['cuda']}",
            f"- sizes: {json.dumps(info['sizes'])}",
            "",
        ]
        for bench, meta in info["benchmarks"].items():
            head.append(
                f"- {bench}: {meta['seconds']:.0f} s, load average {meta['load_before']:.1f} before, "
                f"{meta['load_after']:.1f} after"
            )
        md_path.write_text("\n".join(head) + "\n\n" + "\n".join(sections), encoding="utf-8")
        json_path.write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")

    step_seconds = None
    for bench in chosen:
        common.log(f"\n=== {bench} ===")
        load_before, start = _load(), time.perf_counter()
        if bench == "loss":
            from benchmarks import bench_loss

            report = bench_loss.run(sizes)
            step_seconds = report.data["rows"][0]["median"]
        elif bench == "step":
            from benchmarks import bench_step

            report = bench_step.run(sizes)
        elif bench == "cache":
            from benchmarks import bench_cache

            report = bench_cache.run(sizes, rounds=args.cache_rounds)
        elif bench == "memory":
            from benchmarks import bench_memory

            report = bench_memory.run(sizes, rounds=args.memory_rounds)
        elif bench == "scale":
            from benchmarks import bench_scale

            report = bench_scale.run(sizes, step_seconds=step_seconds)
        elif bench == "pipeline":
            from benchmarks import bench_scale

            rows = args.pipeline_rows or ([2000] if args.quick else [2000, 20_000, 200_000])
            parallel_rows = args.parallel_rows if args.parallel_rows is not None else rows[-1] if args.quick else 200_000
            report = bench_scale.pipeline_run(rows, parallel_rows or None, args.pipeline_rounds or (1 if args.quick else 2))
        else:
            from benchmarks import bench_e2e

            report = bench_e2e.run(
                sizes,
                rounds=args.e2e_rounds,
                textbrewer=not args.no_textbrewer,
                ablation=not args.no_ablation,
                sides=args.e2e_sides,
            )
        info["benchmarks"][bench] = {
            "seconds": time.perf_counter() - start,
            "load_before": load_before,
            "load_after": _load(),
            "data": report.data,
        }
        sections.append(report.markdown())
        write()
    info["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write()
    common.log(f"\nreport: {md_path}\nraw numbers: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
