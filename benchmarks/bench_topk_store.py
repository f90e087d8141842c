"""Top-k teacher store of causal LMs (issue 13, item 4): its size, its build and its reads, side by side in one run.

* **size**: bytes per token per teacher of a store at k = 64 (float16 log-probabilities) against dense float16
  logits, with SmolLM2's vocabulary of 49,152 tokens, both measured on the files written: the store
  ``kdkit.modeling.build_topk_store`` wrote, and one safetensors file of the same positions' logits in float16;
* **build**: tokens per second of ``build_topk_store`` (forward, top-k capture, shards, checksums) against a plain
  forward pass of the same model over the same batches (``inference_mode``, logits computed and dropped),
  interleaved rounds, each build into an empty directory;
* **read**: one random batch of 8 sequences of 128 tokens from a store of 50,000 such sequences (k = 64):
  ``TopKStore.read`` (numpy memmaps of the tensor bytes) against safetensors' ``safe_open`` + ``get_slice`` on
  the same rows, both ending with the same tensors; plus the first touch of rows after the store's pages were
  dropped from the page cache (``posix_fadvise(DONTNEED)``, the other files of the machine untouched).

The model is SmolLM2-135M's architecture (Llama, hidden 576, 30 layers, 9 heads, 3 key-value heads, intermediate
1,536, vocabulary 49,152, tied embeddings: its published config) with random weights: the time of a forward pass
does not depend on the weights, and no download is needed. The 50,000-sequence store is written by
``TopKWriter`` from random rows in the store's layout (a real build would take hours on this CPU); reads do not
depend on the values.

    python -m benchmarks.bench_topk_store --threads 1            # the figures of docs/PERFORMANCE.md
    python -m benchmarks.bench_topk_store --quick                # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common

VOCAB = 49_152
K = 64


def smollm2_shaped(layers: int, seed: int = 0) -> Any:
    """A random-weight Llama with SmolLM2-135M's shape (``layers`` of its 30)."""
    common.quiet_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def token_sequences(count: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=length, dtype=np.int32) for _ in range(count)]


def spec(k: int = K, max_length: int = 128) -> Any:
    from kdkit.store.topk import TopKSpec

    return TopKSpec(teacher="smollm2-135m-shaped-random", tokenizer="smollm2", k=k, temperature=2.0,
                    dtype="float16", max_length=max_length, vocab_size=VOCAB)


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- size and build
def plain_forward(model: Any, sequences: list[np.ndarray], batches: list[list[int]], keep: int = 0) -> list[Any]:
    """The baseline: the same batches through the same model in inference mode; the logits of the first ``keep``
    batches are returned in float16 (for the dense file), the others dropped."""
    kept = []
    with torch.inference_mode(), common.autocast(common.device()):
        for number, batch in enumerate(batches):
            tokens = torch.from_numpy(np.stack([sequences[i] for i in batch])).long().to(common.device())
            logits = model(input_ids=tokens, use_cache=False).logits
            if number < keep:
                kept.append(logits[:, :-1].reshape(-1, VOCAB).half().cpu())
    return kept


def build_side(model: Any, sequences: list[np.ndarray], root: Path, batch_size: int) -> Any:
    from kdkit.modeling import build_topk_store

    shutil.rmtree(root, ignore_errors=True)
    result = build_topk_store(model, sequences, root, spec(), batch_size=batch_size)
    assert result.built
    return result.store


def size_and_build(report: common.Report, args: argparse.Namespace, work: Path) -> None:
    from kdkit.modeling import default_max_tokens
    from kdkit.modeling.topk import plan_batches, prepare_sequences
    from kdkit.store.topk import TopKStore
    from safetensors.torch import save_file

    model = smollm2_shaped(args.layers)
    sequences = token_sequences(args.build_sequences, args.length, seed=1)
    prepared = prepare_sequences(sequences, None, spec())
    batches = plan_batches(prepared, args.batch_size, default_max_tokens(common.device()))
    tokens = sum(len(s) for s in sequences)
    cpu: dict[str, list[float]] = {}
    variants: dict[str, Callable[[], float]] = {
        "plain forward (logits dropped)": _timed(cpu, "plain", plain_forward, model, prepared.tokens, batches),
        "build_topk_store": _timed(cpu, "build", build_side, model, sequences, work / "build", args.batch_size),
    }
    common.log(f"build: {len(sequences)} x {args.length} tokens, {len(batches)} batches, {args.rounds} rounds")
    samples = common.interleave(variants, args.rounds, warmup=0, log=common.log)
    rows = common.summarize(samples, baseline="plain forward (logits dropped)")
    for row, side in zip(rows, ("plain", "build"), strict=True):
        row.extra["tokens/s"] = f"{tokens / row.median:.0f}"
        row.extra["CPU time"] = common.fmt_time(statistics.median(cpu[side]))
        row.extra["CPU time ratio"] = f"{statistics.median(cpu[side]) / statistics.median(cpu['plain']):.3f}x"

    pairs = capture_share(model, prepared, batches, args.rounds)
    shares = [capture / forward for forward, capture in pairs]

    [store_directory] = [p for p in (work / "build").iterdir() if p.is_dir()]  # the last round's store
    store = TopKStore.open(store_directory)
    keep = min(2, len(batches))
    dense_file = work / "dense-fp16-logits.safetensors"
    save_file({"logits": torch.cat(plain_forward(model, prepared.tokens, batches, keep=keep))}, str(dense_file))
    dense_positions = sum(len(prepared.tokens[i]) - 1 for batch in batches[:keep] for i in batch)
    store_bytes, dense_bytes = directory_bytes(store.directory), dense_file.stat().st_size
    dense_file.unlink()
    positions = store.manifest.positions
    report.data.update(build_rows=common.rows_data(rows), tokens=tokens, positions=positions, cpu_seconds=cpu,
                       store_bytes=store_bytes, dense_bytes=dense_bytes, dense_positions=dense_positions,
                       layers=args.layers, forward_capture_cpu_seconds=pairs)
    store_row = f"top-k store, k = {K}, float16 (directory: {len(store.manifest.shards)} shard(s), manifest, .complete)"
    report.add(
        f"**Size** (V = {VOCAB:,}, sequences of {args.length} tokens, bytes on disk of the files written):\n\n"
        + common.markdown_table(
            ["teacher outputs", "positions", "bytes on disk", "bytes per token per teacher", "ratio"],
            [["dense float16 logits (one safetensors file)", f"{dense_positions:,}", f"{dense_bytes:,}",
              f"{dense_bytes / dense_positions:,.1f}", "1.000"],
             [store_row, f"{positions:,}", f"{store_bytes:,}", f"{store_bytes / positions:,.1f}",
              f"{(store_bytes / positions) / (dense_bytes / dense_positions):.5f}"]],
        )
    )
    report.add(
        f"**Build** ({args.layers}-layer SmolLM2-135M-shaped model, random weights; {len(batches)} batches of at "
        f"most {args.batch_size} rows, {tokens:,} tokens per round, {args.rounds} interleaved rounds; device "
        f"{common.device()}):\n\n"
        + common.time_table(rows, "median round", extra_cols=["tokens/s", "CPU time", "CPU time ratio"])
        + f"\n\nThe top-k capture alone, timed back to back with the forward pass of the same batch ({len(pairs)} "
        f"batches of {args.batch_size} x {args.length} tokens): median {statistics.median(shares):.1%} of the "
        f"forward's CPU time (min {min(shares):.1%}, max {max(shares):.1%}); "
        f"{statistics.median(c for _, c in pairs) / (args.batch_size * (args.length - 1)) * 1e6:.0f} us of CPU "
        "per position."
    )


def capture_share(model: Any, prepared: Any, batches: list[list[int]], rounds: int) -> list[tuple[float, float]]:
    """Per batch, the CPU seconds of the forward pass and of the top-k capture of its logits
    (``kdkit.modeling.topk.capture_topk``, as the builder runs it), measured back to back: a pair shares the
    machine's state, so their ratio is steadier than two whole rounds' times on a shared machine."""
    from kdkit.modeling.topk import capture_topk, chunk_positions

    pairs = []
    chunk = chunk_positions(common.device(), VOCAB)
    with torch.inference_mode(), common.autocast(common.device()):
        for _ in range(rounds):
            for batch in batches:
                tokens = torch.from_numpy(np.stack([prepared.tokens[i] for i in batch])).long()
                start = time.process_time()
                logits = model(input_ids=tokens.to(common.device()), use_cache=False).logits
                middle = time.process_time()
                capture_topk(logits, tokens.to(logits.device), K, 2.0, chunk)
                pairs.append((middle - start, time.process_time() - middle))
    return pairs


def chunk_sweep(report: common.Report, rounds: int) -> None:
    """CPU time per position of ``capture_topk`` on the logits of one batch [8, 128, V] (random, spread like a
    trained LM's: N(0, 3)) at T = 2, by chunk size, interleaved rounds: what ``CHUNK_BYTES`` rests on."""
    from kdkit.modeling.topk import capture_topk, chunk_positions

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 128, VOCAB, generator=generator) * 3
    tokens = torch.randint(0, VOCAB, (8, 128), generator=generator)
    chosen = chunk_positions(torch.device("cpu"), VOCAB)
    sizes = sorted({4, chosen, 64, 1024})
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for r in range(rounds + 1):
        for size in sizes if r % 2 == 0 else sizes[::-1]:
            start = time.process_time()
            capture_topk(logits, tokens, K, 2.0, size)
            if r:  # the first round warms up
                times[size].append((time.process_time() - start) / (8 * 127))
    report.data["chunk_sweep_cpu_seconds_per_position"] = times
    body = [[f"{size}{' (CHUNK_BYTES)' if size == chosen else ''}", f"{size * VOCAB * 4 / 2**20:.1f} MiB",
             common.fmt_time(statistics.median(t)), common.fmt_time(min(t))] for size, t in times.items()]
    report.add(
        f"**Chunk size** of the capture on a CPU (logits [8, 128, {VOCAB:,}], k = {K}, T = 2, {rounds} interleaved "
        "rounds, CPU time per position):\n\n"
        + common.markdown_table(["positions per chunk", "float32 logits per chunk", "median", "min"], body)
    )


def _timed(cpu: dict[str, list[float]], side: str, fn: Callable[..., Any], *args: Any) -> Callable[[], float]:
    """A variant for ``common.interleave``: runs ``fn(*args)``, returns its wall time, records its CPU time (on a
    shared machine, the less disturbed of the two)."""

    def run() -> float:
        start, start_cpu = common.now(), time.process_time()
        fn(*args)
        cpu.setdefault(side, []).append(time.process_time() - start_cpu)
        return common.now() - start

    return run


# --------------------------------------------------------------------------- reads
def synthetic_store(root: Path, count: int, length: int, seed: int = 2) -> tuple[Any, float]:
    """A store of ``count`` sequences of ``length`` tokens written by TopKWriter from random rows (and the
    seconds it took)."""
    from kdkit.store.topk import canonical_order, sequence_key, store_key, write_store

    rng = np.random.default_rng(seed)
    keys = [sequence_key(rng.integers(0, VOCAB, size=length, dtype=np.int32)) for _ in range(count)]
    order = canonical_order([length] * count, keys)
    pool = [
        (torch.from_numpy(rng.integers(0, VOCAB, size=(length - 1, K), dtype=np.int32)),
         torch.from_numpy(-np.sort(rng.exponential(3.0, size=(length - 1, K)), axis=1).astype(np.float16)),
         torch.from_numpy(-rng.exponential(3.0, size=length - 1).astype(np.float32)))
        for _ in range(64)
    ]
    key = store_key(spec(max_length=length), keys)
    start = time.perf_counter()
    with write_store(root / key, spec(max_length=length), store=key) as writer:
        for n, i in enumerate(order):
            writer.add(keys[i], *pool[n % len(pool)])
    return root / key, time.perf_counter() - start


def safe_open_reader(store: Any) -> Callable[[list[str]], tuple[torch.Tensor, ...]]:
    """The alternative read path: safetensors' own lazy slices, the handles opened once."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}

    def read(keys: list[str]) -> tuple[torch.Tensor, ...]:
        parts: dict[str, list[torch.Tensor]] = {"ids": [], "logprobs": [], "gold": []}
        counts = []
        for key in keys:
            path, a, b = store.location(key)
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            for name in parts:
                parts[name].append(handles[path].get_slice(name)[a:b])
            counts.append(b - a)
        offsets = torch.zeros(len(keys) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts).cumsum(0)
        return (torch.cat(parts["ids"]).long(), torch.cat(parts["logprobs"]).float(), torch.cat(parts["gold"]),
                offsets)

    return read


def batch_times(read: Callable[[list[str]], Any], batches: list[list[str]]) -> list[float]:
    times = []
    for keys in batches:
        start = time.perf_counter()
        read(keys)
        times.append(time.perf_counter() - start)
    return times


def drop_from_page_cache(directory: Path) -> None:
    for path in directory.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def reads(report: common.Report, args: argparse.Namespace, work: Path) -> None:
    from kdkit.store.topk import TopKStore

    directory, write_seconds = synthetic_store(work / "read", args.read_sequences, args.length)
    start = time.perf_counter()
    store = TopKStore.open(directory)  # checks every shard's checksum
    open_seconds = time.perf_counter() - start
    rng = np.random.default_rng(5)
    keys = store.keys()

    def random_batches(n: int) -> list[list[str]]:
        return [[keys[i] for i in rng.choice(len(keys), size=8, replace=False)] for _ in range(n)]

    # both paths return the same tensors
    check = random_batches(1)[0]
    mine, theirs = store.read(check), safe_open_reader(store)(check)
    assert all(torch.equal(a, b) for a, b in zip((mine.ids, mine.logprobs, mine.gold, mine.offsets), theirs))
    alternative = safe_open_reader(store)
    per_round = args.read_batches // args.rounds
    variants = {
        "TopKStore.read (numpy memmap)": lambda: batch_times(store.read, random_batches(per_round)),
        "safe_open + get_slice": lambda: batch_times(alternative, random_batches(per_round)),
        "TopKStore.read + .padded()": lambda: batch_times(lambda k: store.read(k).padded(), random_batches(per_round)),
    }
    samples = common.interleave(variants, args.rounds, warmup=1)
    rows = common.summarize(samples, baseline="TopKStore.read (numpy memmap)")
    for row in rows:
        flat = [t for r in samples[row.name] for t in r]
        row.extra["p99"] = common.fmt_time(common.quantile(flat, 0.99))
    drop_from_page_cache(directory)
    cold_store = TopKStore.open(directory, verify=False)
    cold = batch_times(cold_store.read, random_batches(200))
    size = directory_bytes(directory)
    positions = store.manifest.positions
    report.data.update(read_rows=common.rows_data(rows), cold_median=statistics.median(cold),
                       cold_p99=common.quantile(cold, 0.99), open_seconds=open_seconds, write_seconds=write_seconds,
                       read_store_bytes=size, read_store_positions=positions)
    report.add(
        f"**Read** a random batch of 8 sequences of {args.length} tokens ({8 * (args.length - 1):,} rows of k = {K}) "
        f"from a store of {len(store):,} sequences ({positions:,} positions, {size / 2**30:.2f} GiB, "
        f"{size / positions:.1f} bytes per token, {len(store.manifest.shards)} shards; written in "
        f"{write_seconds:.1f} s, opened with its checksums verified in {open_seconds:.2f} s), {args.read_batches} "
        f"batches per variant over {args.rounds} interleaved rounds, the store's pages in the page cache:\n\n"
        + common.time_table(rows, "median batch", extra_cols=["p99"])
        + f"\n\nFirst touch after `posix_fadvise(DONTNEED)` on the shards (200 batches): median "
        f"{common.fmt_time(statistics.median(cold))}, p99 {common.fmt_time(common.quantile(cold, 0.99))}."
    )


def header(data: dict[str, Any]) -> str:
    """The lines a results file starts with: the command, when, the machine and its load."""
    machine = data["machine"]
    start = ", ".join(f"{v:.2f}" for v in machine.get("loadavg_at_start", ()))
    end = ", ".join(f"{v:.2f}" for v in data.get("loadavg_at_end", ()))
    return (
        f"`{data['command']}`, started {data['started']}\n\n"
        f"Machine: {machine.get('cpu', '?')}, {machine['cpus']} CPUs, torch {machine['torch']} on "
        f"{machine['threads']} thread(s), Python {machine['python']}, transformers {machine.get('transformers')}, "
        f"CUDA {machine['cuda']}; load average {start} at the start, {end} at the end.\n\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (1 on a shared machine)")
    parser.add_argument("--layers", type=int, default=30, help="layers of the SmolLM2-shaped model (30: all)")
    parser.add_argument("--build-sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--read-sequences", type=int, default=50_000)
    parser.add_argument("--read-batches", type=int, default=3000)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--name", default="topk-store", help="report name under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.build_sequences, args.rounds, args.read_sequences, args.read_batches = 2, 8, 2, 2000, 200
        args.name = f"{args.name}-quick"
    if args.threads:
        torch.set_num_threads(args.threads)
    report = common.Report(args.name, "Top-k teacher store: size, build, reads")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report.data.update(machine=common.machine(), args={k: str(v) for k, v in vars(args).items()}, started=started)
    work = args.work or Path(tempfile.mkdtemp(prefix="kdkit-topk-bench-"))
    try:
        size_and_build(report, args, work)
        if common.device().type == "cpu":
            chunk_sweep(report, args.rounds * 2)
        reads(report, args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report.data["loadavg_at_end"] = os.getloadavg()
    given = argv if argv is not None else sys.argv[1:]
    report.data["command"] = " ".join(["python -m benchmarks.bench_topk_store", *given])
    common.RESULTS_DIR.mkdir(exist_ok=True)
    (common.RESULTS_DIR / f"{args.name}.md").write_text(header(report.data) + report.markdown(), encoding="utf-8")
    (common.RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(report.data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
