"""Token-level distillation (issue 13): the student step and its peak memory against plain causal-LM fine-tuning.

The same student (a randomly initialised Llama: vocabulary 16,384, hidden 256, 4 layers, float32; its weights do
not change the cost), the same batches (8 sequences of 128 tokens), AdamW, one optimizer step per step:

* ``plain causal-LM fine-tuning``: ``model(input_ids, labels=input_ids).loss`` (Hugging Face's own shifted
  cross-entropy, what a stock ``Trainer`` minimises), backward, ``optimizer.step()``;
* ``kdkit N=...``: ``model(input_ids).logits`` into :class:`kdkit.TokenDistillationLoss` over synthetic stored
  top-k teacher outputs (:class:`kdkit.TopKTeachers`, k = 64, log-probabilities in float16) with UniKD's plugins
  (``unikd-correctness`` + ``unikd-disagreement``; correctness alone for N = 1), half the sequences labeled and
  half generated (unlabeled), temperature 2; and AE-KD for N = 5. Targets: <= 1.10x, constant in N.

Synthetic top-k: for each position a pool of 2k distinct token ids; each teacher lists k of them (random order
and subset), so the teachers overlap as models of one family do and the union holds 64-128 ids (the three
small LMs trained by ``benchmarks/topk_error.py`` had a median union of 109 ids, at most 161, for k = 64). Variants
are interleaved (A B C ... then ... C B A), one warm-up round thrown away, ratios taken round by round, for the wall
time and for the process CPU time of each step (one thread: on a shared machine the CPU time is the work done,
the wall time also the wait for a core).

Peak memory: each variant in a fresh process (``--child``), ``VmHWM`` (peak resident memory) over set-up and 3
steps, and the step's own share: ``VmHWM`` minus the resident memory after set-up (model, optimizer state after
one step, batches and teacher outputs in memory). Target: <= 1.15x.

    python -m benchmarks.bench_tokens                 # the whole table (42 min on 1 thread of the busy machine here)
    python -m benchmarks.bench_tokens --quick         # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

UNIKD = {"unikd-correctness": {}, "unikd-disagreement": {"lambda": 10.0}}


@dataclass
class TokenSizes:
    vocab: int = 16384
    hidden: int = 256
    layers: int = 4
    batch: int = 8
    seq: int = 128
    k: int = 64
    temperature: float = 2.0
    teachers: tuple[int, ...] = (1, 3, 5, 10)
    steps: int = 3  #: timed steps per round and variant
    rounds: int = 5
    threads: int = 1

    @classmethod
    def quick(cls) -> TokenSizes:
        return cls(vocab=2048, hidden=64, layers=2, batch=2, seq=32, k=16, teachers=(1, 5), steps=1, rounds=1)


def student(sizes: TokenSizes, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    common.quiet_transformers()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=3 * sizes.hidden,
        num_hidden_layers=sizes.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=sizes.seq, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def batch(sizes: TokenSizes, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids; labels aligned with the logits (labels[:, t] = input_ids[:, t + 1]); generated: the second half
    of the sequences (the teachers wrote them), whose labels are -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    generated = torch.zeros_like(ids, dtype=torch.bool)
    generated[sizes.batch // 2:, :-1] = True
    labels[generated] = -100
    return {"input_ids": ids, "labels": labels, "generated": generated}


def synthetic_topk(sizes: TokenSizes, n: int, seed: int) -> Any:
    """Stored top-k outputs of ``n`` teachers (see the module docstring)."""
    import kdkit

    gen = torch.Generator().manual_seed(seed)
    positions, k, v = sizes.batch * sizes.seq, sizes.k, sizes.vocab
    offset = torch.randint(0, v, (positions, 1), generator=gen)
    step = torch.randint(1, max(2, v // (2 * k)), (positions, 1), generator=gen)
    pool = (offset + step * torch.arange(2 * k)) % v  # 2k distinct ids per position
    pick = torch.rand(positions, n, 2 * k, generator=gen).argsort(dim=-1)[..., :k]
    ids = pool.unsqueeze(1).expand(-1, n, -1).gather(-1, pick)
    top_mass = torch.log(torch.tensor(0.9))  # the k tokens hold 90% of each teacher's probability
    log_probs = torch.log_softmax(2.0 * torch.randn(positions, n, k, generator=gen), dim=-1) + top_mass
    gold = torch.log(torch.rand(positions, n, generator=gen)).float()
    shape = (sizes.batch, sizes.seq)
    return kdkit.TopKTeachers(ids.view(*shape, n, k), log_probs.half().view(*shape, n, k), gold.view(*shape, n),
                              sizes.temperature, v)


def plain_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss


def token_step(loss_fn: Any, teachers: Any) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=inputs["input_ids"]).logits
        return loss_fn(logits, teachers, inputs["labels"], inputs["generated"]).loss

    return step


def variants(sizes: TokenSizes) -> dict[str, dict[str, Any]]:
    """``{name: spec}``: what each side computes (rebuilt the same way in a child process)."""
    out: dict[str, dict[str, Any]] = {"plain causal-LM fine-tuning": {"kind": "plain"}}
    for n in sizes.teachers:
        plugins = {"unikd-correctness": {}} if n == 1 else UNIKD
        label = "+".join(p.replace("unikd-", "") for p in plugins)
        out[f"kdkit N={n} unikd ({label})"] = {"kind": "tokens", "n": n, "plugins": plugins}
    if 5 in sizes.teachers:
        out["kdkit N=5 aekd"] = {"kind": "tokens", "n": 5, "plugins": {"aekd": {}}}
    return out


def build(sizes: TokenSizes, spec: dict[str, Any]) -> tuple[torch.nn.Module, Any, Callable[..., torch.Tensor]]:
    import kdkit

    model = student(sizes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if spec["kind"] == "plain":
        return model, optimizer, plain_step
    loss_fn = kdkit.TokenDistillationLoss.from_plugins(spec["plugins"], temperature=sizes.temperature)
    return model, optimizer, token_step(loss_fn, synthetic_topk(sizes, spec["n"], seed=spec["n"]))


def timed_steps(model, optimizer, step, inputs, count: int, cpu: list[float] | None = None) -> list[float]:
    """Wall time of each of ``count`` steps; the process CPU time of each is appended to ``cpu``."""
    times = []
    for _ in range(count):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return times


def run_speed(sizes: TokenSizes) -> tuple[list[common.Row], list[common.Row]]:
    """Rows of wall time and of process CPU time per step (one thread: CPU time is the work done, whatever
    other processes took the core meanwhile), ratios round by round against plain fine-tuning."""
    inputs = batch(sizes)
    built = {name: build(sizes, spec) for name, spec in variants(sizes).items()}
    for model, optimizer, step in built.values():
        timed_steps(model, optimizer, step, inputs, 1)  # optimizer state allocated
    cpu: dict[str, list[list[float]]] = {name: [] for name in built}

    def runner(name: str) -> Callable[[], list[float]]:
        def once() -> list[float]:
            cpu[name].append([])
            return timed_steps(*built[name], inputs, sizes.steps, cpu=cpu[name][-1])

        return once

    samples = common.interleave({name: runner(name) for name in built}, sizes.rounds, log=common.log)
    cpu = {name: rounds[1:] for name, rounds in cpu.items()}  # the warm-up round, as interleave drops it
    baseline = "plain causal-LM fine-tuning"
    return common.summarize(samples, baseline=baseline), common.summarize(cpu, baseline=baseline)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(sizes: TokenSizes, spec: dict[str, Any]) -> dict[str, float]:
    """In a fresh process: set up, one step (optimizer state), then 3 steps; peak and set-up memory in MiB."""
    torch.set_num_threads(sizes.threads)
    inputs = batch(sizes)
    model, optimizer, step = build(sizes, spec)
    timed_steps(model, optimizer, step, inputs, 1)
    settled = _rss_mb("VmRSS")
    timed_steps(model, optimizer, step, inputs, 3)
    return {"peak": _rss_mb("VmHWM"), "settled": settled}


def run_memory(sizes: TokenSizes) -> dict[str, dict[str, float]]:
    out = {}
    for name, spec in variants(sizes).items():
        payload = json.dumps({"sizes": asdict(sizes), "spec": spec})
        # a fixed mmap threshold: every tensor above 64 KiB is mapped on allocation and unmapped when freed
        # (glibc otherwise raises the threshold after the first frees and keeps freed blocks resident), so that
        # resident memory follows the live tensors and the peak of a step is seen as such
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_tokens", "--child", payload],
                              capture_output=True, text=True, check=True, env=env)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        common.log(f"  memory {name}: {out[name]}")
    return out


def report(
    sizes: TokenSizes, rows: tuple[list[common.Row], list[common.Row]], memory: dict[str, dict[str, float]],
    load: tuple[str, str],
) -> str:
    plain = memory["plain causal-LM fine-tuning"]
    rows, cpu_rows = rows
    for row, cpu_row in zip(rows, cpu_rows):
        row.extra["CPU time"] = common.fmt_time(cpu_row.median)
        row.extra["CPU ratio"] = common.fmt_ratio(cpu_row)
        mem = memory[row.name]
        row.extra["peak RSS"] = f"{mem['peak']:.0f} MiB ({mem['peak'] / plain['peak']:.3f}x)"
        step_mem, plain_step_mem = mem["peak"] - mem["settled"], plain["peak"] - plain["settled"]
        row.extra["step's own peak"] = f"{step_mem:.0f} MiB ({step_mem / plain_step_mem:.3f}x)"
    return (
        f"Student Llama V = {sizes.vocab}, hidden {sizes.hidden}, {sizes.layers} layers; batch {sizes.batch} x "
        f"{sizes.seq}; k = {sizes.k}, T = {sizes.temperature}; {sizes.rounds} interleaved rounds x {sizes.steps} "
        f"steps; {sizes.threads} thread(s). Load average before: {load[0]}; after: {load[1]}.\n\n"
        + common.time_table(rows, "median step", extra_cols=["CPU time", "CPU ratio", "peak RSS", "step's own peak"])
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        payload = json.loads(args.child)
        sizes = TokenSizes(**{**payload["sizes"], "teachers": tuple(payload["sizes"]["teachers"])})
        print(json.dumps(child(sizes, payload["spec"])))
        return
    sizes = TokenSizes.quick() if args.quick else TokenSizes()
    sizes.threads = args.threads
    if args.rounds:
        sizes.rounds = args.rounds
    torch.set_num_threads(sizes.threads)
    before = os.getloadavg()
    memory = run_memory(sizes)
    rows = run_speed(sizes)
    after = os.getloadavg()
    load = (" ".join(f"{x:.2f}" for x in before), " ".join(f"{x:.2f}" for x in after))
    print(report(sizes, rows, memory, load), flush=True)


if __name__ == "__main__":
    main()
