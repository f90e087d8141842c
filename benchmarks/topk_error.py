"""How far a top-k teacher store (k < V) moves the token objective from the dense one, on real predictions.

Randomly initialised LMs predict nearly flat distributions, on which a top-k holds almost no mass and says little
about real use. This script trains small causal LMs for a few hundred steps on Python's own standard-library
sources (offline: the ``*.py`` files next to ``os.py``; a byte-level BPE tokenizer of 8,192 tokens trained on them
here), which gives the peaked next-token distributions of a real model, then compares, on held-out files:

* the teachers' top-k mass and the size of the union of their top-k (the support ``|S_p|``);
* the kd term per position (forward KL, average of the teachers) with top-k teachers against dense ones;
* its gradient with respect to the student's logits (relative error of the norm, cosine);
* UniKD's disagreement ``L_p`` (mean pairwise KL) on ``S_p + tail`` against the full-vocabulary KL;
* AE-KD's teacher weights (batch mean in vocabulary space, tail lumped) against the dense ones.

Three teachers (Llama, hidden 128, 2 layers) trained for ``--teacher-steps`` steps from different seeds and data
orders; the student is the same architecture after ``--student-steps`` steps (an early student, as in training).

    python -m benchmarks.topk_error --logits /tmp/heldout_logits.pt   # 25 min on one thread here; 5 min again
"""

from __future__ import annotations

import argparse
import os
import random
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import kdkit  # noqa: E402
from benchmarks import common  # noqa: E402

VOCAB = 8192
SEQ = 128


def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the standard library's top-level modules, every 8th file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if i % 8 == 0]


def tokenizer(texts: list[str]):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, show_progress=False)
    return tok


def chunks(tok, texts: list[str]) -> torch.Tensor:
    """``[rows, SEQ + 1]`` token ids: the texts' tokens end to end, cut into windows."""
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    rows = len(ids) // (SEQ + 1)
    return torch.tensor(ids[: rows * (SEQ + 1)]).view(rows, SEQ + 1)


def model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def train(seed: int, data: torch.Tensor, steps: int, batch: int = 8) -> torch.nn.Module:
    net = model(seed).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    order = random.Random(seed)
    start = time.perf_counter()
    for step in range(steps):
        rows = data[[order.randrange(len(data)) for _ in range(batch)]]
        loss = net(input_ids=rows[:, :-1], labels=rows[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            common.log(f"  model {seed}: step {step + 1}/{steps}, loss {loss.item():.3f} ({elapsed:.0f} s)")
    return net.eval()


def quantiles(values: torch.Tensor) -> str:
    """``median / 95th percentile / max`` of a tensor of errors, as text."""
    flat = values.double().flatten()
    return f"{float(flat.median()):.2e} / {float(flat.quantile(0.95)):.2e} / {float(flat.max()):.2e}"


def run(student_logits, teachers, plugins: dict, temperature: float):
    """The objective on every position as unlabeled (so the loss is the mean kd term) and its gradient."""
    b, t = student_logits.shape[:2]
    labels = torch.full((b, t), -100)
    generated = torch.ones(b, t, dtype=torch.bool)
    z = student_logits.clone().requires_grad_(True)
    out = kdkit.TokenDistillationLoss.from_plugins(plugins, temperature=temperature)(z, teachers, labels, generated)
    out.loss.backward()
    return out, z.grad.flatten(0, 1)


def student_on_support(student_logits: torch.Tensor, support, temperature: float) -> torch.Tensor:
    """``[P, S + 1]`` the student's log-probabilities on each support and its tail, float64, from the dense logits."""
    log_q = torch.log_softmax(student_logits.double().flatten(0, 1) / temperature, dim=-1)
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, support.ids, False)
    tail = torch.logsumexp(log_q.masked_fill(~outside, -torch.inf), dim=1, keepdim=True)
    return torch.cat([log_q.gather(1, support.ids), tail], dim=1)


def kl_divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, topk, temperature: float):
    """``KL(target || q)`` per position, the target the plain average of the teachers: on the full vocabulary
    (dense) and on ``S_p + tail`` (top-k), float64. The kd term kdkit reports is the cross-entropy, which differs
    from this by the target's entropy: a constant of the student, but not the same constant on the two supports."""
    from kdkit.distill.support import combine_supports

    log_q = torch.log_softmax(student_logits.double().flatten(0, 1) / temperature, dim=-1)  # [P, V]
    target = torch.softmax(teacher_logits.double().flatten(0, 1) / temperature, dim=-1).mean(dim=1)
    dense = (target * (target.clamp_min(1e-300).log() - log_q)).sum(dim=-1)
    support = combine_supports(topk.ids.flatten(0, 1), topk.log_probs.double().flatten(0, 1), log_q.shape[-1])
    sparse_target = support.teacher_log_probs.exp().mean(dim=1)  # [P, S + 1]
    sparse_q = student_on_support(student_logits, support, temperature)
    keep = torch.cat([support.valid, torch.ones_like(support.valid[:, :1])], dim=1) & (sparse_target > 0)
    terms = sparse_target * (sparse_target.clamp_min(1e-300).log() - sparse_q)
    return dense, torch.where(keep, terms, torch.zeros_like(terms)).sum(dim=-1)


def aekd_tails_lumped(student_logits: torch.Tensor, topk, temperature: float) -> list[float]:
    """AE-KD's batch-mean weights (C = 0.6) with every position's tail added to one shared coordinate: the
    alternative to kdkit's even spread, for comparison."""
    from kdkit.distill.support import combine_supports
    from kdkit_plugins.aekd import min_norm_capped_simplex

    v = student_logits.shape[-1]
    support = combine_supports(topk.ids.flatten(0, 1), topk.log_probs.double().flatten(0, 1), v)
    diff = student_on_support(student_logits, support, temperature).exp().unsqueeze(1) - support.teacher_log_probs.exp()
    ids = support.class_ids()
    ids = torch.where(ids == kdkit.plugin.REST, v, ids)
    used = ids >= 0
    g = torch.zeros(diff.shape[1], v + 1, dtype=torch.float64)
    g.index_add_(1, ids[used], diff.permute(1, 0, 2)[:, used])
    g /= diff.shape[0]
    return min_norm_capped_simplex((g @ g.T).tolist(), 0.6)


def compare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float) -> dict[str, str]:
    """Figures of one k and T on the held-out batch (module docstring)."""
    b, t = student_logits.shape[:2]
    topk = kdkit.TopKTeachers.from_logits(teacher_logits, torch.full((b, t), -100), k=k, temperature=temperature)
    probs = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    mass = probs.topk(k, dim=-1).values.sum(dim=-1)
    union = torch.tensor([len(set(row.tolist())) for row in topk.ids.flatten(0, 1).flatten(1)]).double()
    figures = {
        "top-k mass: median / 5th pct": f"{float(mass.median()):.3f} / {float(mass.flatten().quantile(0.05)):.3f}",
        "|S_p|: median / max": f"{float(union.median()):.0f} / {float(union.max()):.0f}",
    }
    dense, dense_grad = run(student_logits, teacher_logits, {"average": {}}, temperature)
    sparse, sparse_grad = run(student_logits, topk, {"average": {}}, temperature)
    dense_kl, sparse_kl = kl_divergences(student_logits, teacher_logits, topk, temperature)
    figures["KL(target || q): relative error, median / p95 / max"] = quantiles((sparse_kl - dense_kl).abs() / dense_kl)
    per_position = (sparse_grad - dense_grad).norm(dim=1) / dense_grad.norm(dim=1)
    figures["kd gradient: relative error, median / p95 / max"] = quantiles(per_position)
    cosine = torch.nn.functional.cosine_similarity(sparse_grad, dense_grad, dim=1)
    figures["kd gradient: cosine, median / min"] = f"{float(cosine.median()):.6f} / {float(cosine.min()):.6f}"
    plugins = {"unikd-disagreement": {"lambda": 1.0, "apply_to": "all"}}
    dense_lp = run(student_logits, teacher_logits, plugins, temperature)[0].sample_weights.double() - 1
    sparse_lp = run(student_logits, topk, plugins, temperature)[0].sample_weights.double() - 1
    figures["L_p: relative error, median / p95 / max"] = quantiles((sparse_lp - dense_lp).abs() / dense_lp)
    figures["L_p dense: median"] = f"{float(dense_lp.median()):.3f}"
    for gradient in ("batch-mean", "per-sample"):
        plugins = {"aekd": {"gradient": gradient}}
        dense_w = run(student_logits, teacher_logits, plugins, temperature)[0].teacher_weights[0]
        sparse_w = run(student_logits, topk, plugins, temperature)[0].teacher_weights[0]
        figures[f"AE-KD {gradient} weights: dense -> top-k"] = (
            f"{[round(x, 3) for x in dense_w.tolist()]} -> {[round(x, 3) for x in sparse_w.tolist()]}"
        )
    lumped = aekd_tails_lumped(student_logits, topk, temperature)
    figures["AE-KD batch-mean, tails lumped instead"] = f"{[round(x, 3) for x in lumped]}"
    return figures


def held_out_logits(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train the teachers and the student; their logits ``[B, T, V]``, ``[B, T, 3, V]`` on held-out sequences,
    and the gold tokens ``[B, T]``."""
    train_texts, held_out = corpus()
    tok = tokenizer(train_texts)
    data, evaluation = chunks(tok, train_texts), chunks(tok, held_out)
    common.log(f"corpus: {len(train_texts)} + {len(held_out)} files, {data.numel()} + {evaluation.numel()} tokens")
    teachers = [train(seed, data, args.teacher_steps) for seed in (1, 2, 3)]
    student = train(0, data, args.student_steps)
    order = torch.randperm(len(evaluation), generator=torch.Generator().manual_seed(0))
    rows = evaluation[order[: args.eval_sequences]]
    with torch.no_grad():
        inputs = rows[:, :-1]
        student_logits = student(input_ids=inputs).logits
        teacher_logits = torch.stack([m(input_ids=inputs).logits for m in teachers], dim=2)
    return student_logits, teacher_logits, rows[:, 1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=60)
    parser.add_argument("--eval-sequences", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logits", type=Path, help="keep the held-out logits in this file and reuse them if there")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    common.quiet_transformers()
    started, load = time.time(), os.getloadavg()
    if args.logits is not None and args.logits.exists():
        student_logits, teacher_logits, gold = torch.load(args.logits).values()
    else:
        student_logits, teacher_logits, gold = held_out_logits(args)
        if args.logits is not None:
            torch.save({"student": student_logits, "teachers": teacher_logits, "gold": gold}, args.logits)
    nll = [float(torch.nn.functional.cross_entropy(teacher_logits[:, :, i].flatten(0, 1), gold.flatten()))
           for i in range(3)]
    student_nll = float(torch.nn.functional.cross_entropy(student_logits.flatten(0, 1), gold.flatten()))
    print(f"held-out NLL (nats/token): teachers {', '.join(f'{x:.3f}' for x in nll)}; student {student_nll:.3f}")
    results = {(k, t): compare(student_logits, teacher_logits, k, t) for t in (1.0, 2.0) for k in (8, 16, 64, 256)}
    names = list(next(iter(results.values())))
    print(common.markdown_table(["figure", *[f"k = {k}, T = {t:g}" for k, t in results]],
                                [[name, *[results[key][name] for key in results]] for name in names]))
    print(f"\n{args.eval_sequences} x {SEQ} held-out positions, V = {VOCAB}, 3 teachers; "
          f"{time.time() - started:.0f} s; load average before {load}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
