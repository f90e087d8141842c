"""Tiny causal LMs and a float64 reference of the token-level objective, written independently of kdkit.

The models are 2-layer Llama configs with a 64-token vocabulary (random weights, ``initializer_range = 0.3`` so
that their next-token distributions are far from flat), built locally in well under a second. The reference
(:func:`reference_tokens`) loops over positions and teacher pairs in plain torch float64, computing every
equation of docs/METHOD.md from the dense logits; :func:`reference_support` builds the sparse supports of
DESIGN.md section 4 with Python sets. Neither calls kdkit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from test_equations import brute_force  # min a^T G a on the capped simplex, by enumeration

VOCAB = 64
IGNORE = -100


def tiny_lm(seed: int, *, vocab: int = VOCAB, layers: int = 2, hidden: int = 32, init: float = 0.3):
    """A randomly initialised 2-layer Llama causal LM (float64, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=init,
    )
    return LlamaForCausalLM(config).double().eval()


@dataclass
class LMBatch:
    """Sequences with their aligned labels: ``labels[:, t]`` is the token after position ``t``."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 where no gold token
    generated: torch.Tensor  # [B, T] bool


def lm_batch(mix: str, *, batch: int = 3, length: int = 9, vocab: int = VOCAB, seed: int = 0) -> LMBatch:
    """A batch whose in-play positions are all labeled, all unlabeled (generated) or mixed.

    Each sequence: a prompt of 2 tokens (ignored), then its continuation; the last position has no next token and
    the last sequence ends in 2 padding positions (ignored). ``mixed``: sequence 0 is labeled, sequence 1
    generated, sequence 2 labeled. A generated position keeps its label (the generated token): it must be ignored.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    labels = torch.full((batch, length), IGNORE)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :1] = IGNORE  # the prompt predicts its own second token: not trained on
    labels[-1, -3:] = IGNORE  # padding
    generated = torch.zeros(batch, length, dtype=torch.bool)
    continuation = labels != IGNORE
    if mix == "unlabeled":
        generated = continuation.clone()
    elif mix == "mixed":
        generated[1] = continuation[1]
    elif mix != "labeled":
        raise ValueError(mix)
    return LMBatch(ids, labels, generated)


def lm_logits(models, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T, len(models), V]`` float64 logits of several models (or ``[B, T, V]`` for one model)."""
    with torch.no_grad():
        if not isinstance(models, (list, tuple)):
            return models(input_ids).logits.double()
        return torch.stack([m(input_ids).logits.double() for m in models], dim=2)


# --------------------------------------------------------------------------------------------- the reference
def softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max())
    return e / e.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for float64 vectors, 0 log 0 = 0."""
    keep = p > 0
    return (p[keep] * (torch.log(p[keep]) - torch.log(q[keep]))).sum()


@dataclass
class Position:
    b: int
    t: int
    labeled: bool
    gold: int
    q: torch.Tensor  # student softmax(z / T), with the autograd graph
    z: torch.Tensor  # student logits
    teachers: list[torch.Tensor]  # P_i = softmax(z_t / T)
    losses: list[float] = field(default_factory=list)  # L_i at T = 1 (labeled)


def positions_in_play(student, teachers, labels, generated, temperature, on) -> list[Position]:
    out = []
    batch, length, n = student.shape[0], student.shape[1], teachers.shape[2]
    for b in range(batch):
        for t in range(length):
            gen = bool(generated[b, t])
            lab = int(labels[b, t]) != IGNORE and not gen
            if not (lab or (gen and "unlabeled" in on)):
                continue
            gold = int(labels[b, t]) if lab else -1
            pos = Position(b, t, lab, gold, softmax(student[b, t] / temperature), student[b, t],
                           [softmax(teachers[b, t, i] / temperature) for i in range(n)])
            if lab:
                pos.losses = [float(-torch.log(softmax(teachers[b, t, i])[gold])) for i in range(n)]
            out.append(pos)
    return out


def reference_weights(rows: list[Position], plugins: dict, n: int) -> list[tuple[list[float], float, float]]:
    """``(w, k, s)`` per position from the equations of docs/METHOD.md."""
    out = []
    for pos in rows:
        w, k, s = [1.0 / n] * n, 1.0, 1.0
        if "unikd-correctness" in plugins and pos.labeled:
            eps = plugins["unikd-correctness"].get("eps", 1e-6)
            inv = [1.0 / (loss + eps) for loss in pos.losses]
            w = [x / sum(inv) for x in inv]
            k = 1.0 / (1.0 + sum(pos.losses) / n)
        disagreement = plugins.get("unikd-disagreement")
        if disagreement is not None and (not pos.labeled or disagreement.get("apply_to") == "all"):
            pairs = [float(kl(pos.teachers[i], pos.teachers[j])) for i in range(n) for j in range(n) if i != j]
            s = 1.0 + plugins["unikd-disagreement"].get("lambda", 10.0) * sum(pairs) / (n * (n - 1))
        out.append((w, k, s))
    if "aekd" in plugins:
        cap = plugins["aekd"].get("C", 0.6)
        for stream in (True, False):
            members = [r for r, pos in enumerate(rows) if pos.labeled == stream]
            if not members:
                continue
            g = [sum((rows[r].q.detach() - rows[r].teachers[i]) for r in members) / len(members) for i in range(n)]
            gram = np.array([[float(gi @ gj) for gj in g] for gi in g])
            a = brute_force(gram, cap)[1].tolist()
            for r in members:
                out[r] = (a, out[r][1], out[r][2])
    return out


def reference_tokens(student, teachers, labels, generated, *, plugins: dict, temperature: float = 1.0,
                     on=("labeled", "unlabeled"), divergence: str = "forward-kl", beta: float = 0.5) -> dict:
    """The token objective from dense float64 logits, position by position. ``loss`` keeps the graph to
    ``student`` (weights are constants)."""
    n = teachers.shape[2]
    rows = positions_in_play(student, teachers, labels, generated, temperature, on)
    weights = reference_weights(rows, plugins, n)
    per = []
    for pos, (w, k, s) in zip(rows, weights):
        target = sum(w[i] * pos.teachers[i] for i in range(n))
        stream = "labeled" if pos.labeled else "unlabeled"
        kd = divergence_reference(target, pos.q, divergence, beta) * temperature**2 if stream in on else 0.0
        task = -torch.log(softmax(pos.z)[pos.gold]) if pos.labeled else 0.0
        per.append(s * (k * kd + task))
    per_position = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in per])
    return {
        "loss": per_position.mean(),
        "per_position": per_position.detach(),
        "teacher_weights": torch.tensor([w for w, _, _ in weights], dtype=torch.float64),
        "kd_weights": torch.tensor([k for _, k, _ in weights], dtype=torch.float64),
        "sample_weights": torch.tensor([s for _, _, s in weights], dtype=torch.float64),
        "positions": [(pos.b, pos.t) for pos in rows],
    }


def divergence_reference(target: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "forward-kl":
        return -(target * torch.log(q)).sum()
    if kind == "reverse-kl":
        return kl(q, target)
    mix = beta * target + (1 - beta) * q
    return beta * kl(target, mix) + (1 - beta) * kl(q, mix)


# --------------------------------------------------------------------------------------------- sparse supports
def reference_support(student_row, teacher_rows, k: int, temperature: float):
    """One position, by DESIGN.md section 4 with Python sets and floats.

    Returns ``(support ids sorted, teacher distributions [N][|S|+1], student distribution [|S|+1])``, the tail last.
    """
    v = student_row.shape[0]
    tops, probs = [], []
    for row in teacher_rows:
        p = softmax(row.double() / temperature).tolist()
        top = sorted(range(v), key=lambda tok: -p[tok])[:k]
        tops.append(set(top))
        probs.append(p)
    support = sorted(set().union(*tops))
    outside_support = v - len(support)
    dists = []
    for top, p in zip(tops, probs):
        missing = 1.0 - sum(p[tok] for tok in top)
        each = missing / (v - k) if v > k else 0.0
        on_support = [p[tok] if tok in top else each for tok in support]
        dists.append(on_support + [each * outside_support])
    q = softmax(student_row.double() / temperature).tolist()
    student = [q[tok] for tok in support]
    student.append(sum(q[tok] for tok in range(v) if tok not in set(support)))
    return support, dists, student
