"""The student's distribution on each position's support, computed over the vocabulary in chunks of positions.

For position ``p`` with support ids ``S_p`` (a few hundred tokens) the token objective needs, from the student's
logits ``z_p`` ``[V]``:

* ``log q_p[s] = z_p[s] / T - lse(z_p / T)`` for every ``s`` in ``S_p`` (``lse``: log-sum-exp over V),
* ``log q_p[tail] = lse_{v not in S_p}(z_p / T) - lse(z_p / T)``, the log of the mass outside the support,
* ``log p_p[gold] = z_p[gold] - lse(z_p)``, the student's log-probability of the gold token at temperature 1
  (its task loss).

Autograd over ``log_softmax(z / T)`` would keep a ``[P, V]`` float32 block alive (and one more at T = 1) from the
forward to the backward pass. :class:`SupportLogProbs` instead keeps only per-position scalars (three log-sum-exps)
and recomputes each chunk of positions in the backward pass, writing straight into the gradient buffer. At any
time it holds one ``[chunk, V]`` float32 block beyond the model's own logits and their gradient.

Backward, with ``g`` the gradients of the outputs (``g_s`` per support slot, ``g_tail``, ``g_gold``),
``G = sum_s g_s + g_tail``, ``q = softmax(z / T)``, ``q_tail`` the tail's mass and ``p1 = softmax(z)``::

    dL/dz_v = (1/T) * (g_s - G q_s)                                 v = s in S_p
            = (1/T) * (q_v / q_tail) * (g_tail - G q_tail)          v outside S_p
            + g_gold * (1[v = gold] - p1_v)                          (every v)

``q_v / q_tail = exp(z_v / T - lse_tail)`` is at most 1 for a token of the tail, so nothing overflows even when the
tail's mass is below the smallest float. At T = 1, ``p1 = q`` and the last line folds into the first two
(``G`` becomes ``G + g_gold``): the vocabulary is read once per chunk in each direction. At T > 1 the forward pass
still reads it once (``_forward_chunk``) and the backward pass twice (the last line is its own pass).
"""

from __future__ import annotations

from typing import Any

import torch

#: Rows of ``[chunk, V]`` per chunk: the largest number keeping one float32 block at or below 2^22 elements
#: (16 MiB). Chunks of 16-64 MiB measured the same step time on the CPU (benchmarks/bench_tokens.py).
CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab_size``: ``CHUNK_ELEMENTS / V``, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _Rows:
    """Reads and writes the rows ``(seq[c], pos[c])`` of a ``[B, T, V]`` tensor, a chunk at a time.

    For a contiguous tensor (a model's logits) a chunk is read with ``index_select`` and written with
    ``index_copy_`` / ``index_add_`` on the ``[B * T, V]`` view, several times faster on a CPU than advanced
    indexing (measured here: 2 ms against 20 ms for a 256 x 16,384 float32 block, one thread); a sliced tensor
    (``logits[:, :-1]``) falls back to advanced indexing rather than copying all of it.
    """

    def __init__(self, logits: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
        self.seq, self.pos = seq, pos
        self.flat = logits.view(-1, logits.shape[-1]) if logits.is_contiguous() else None
        self.rows = seq * logits.shape[1] + pos

    def read(self, logits: torch.Tensor, c: slice, dtype: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
        """``logits[seq[c], pos[c]] / temperature`` as a fresh ``[c, V]`` block of ``dtype`` (safe to change in
        place: the model's logits are never touched)."""
        if self.flat is not None:
            block = self.flat.index_select(0, self.rows[c])
        else:
            block = logits[self.seq[c], self.pos[c]]
        return _scaled_(block.to(dtype), temperature)

    def write(self, grad: torch.Tensor, c: slice, block: torch.Tensor, *, add: bool = False) -> None:
        """Put ``block`` (or add it) into the rows of chunk ``c`` of ``grad`` (shaped like the logits)."""
        block = block.to(grad.dtype)
        if self.flat is not None:
            flat = grad.view(-1, grad.shape[-1])
            (flat.index_add_ if add else flat.index_copy_)(0, self.rows[c], block)
        else:
            grad.index_put_((self.seq[c], self.pos[c]), block, accumulate=add)


def _scaled_(block: torch.Tensor, temperature: float) -> torch.Tensor:
    """``block / temperature`` in place. Below T = 1 a huge finite logit can overflow: clamped to the finite
    range then (at T >= 1 nothing finite overflows, and the pass is saved)."""
    if temperature != 1.0:
        block.div_(temperature)
    if temperature < 1.0:
        big = torch.finfo(block.dtype).max
        block.clamp_(-big, big)
    return block


class SupportLogProbs(torch.autograd.Function):
    """``(log q[S_p], log q[tail], log p1[gold])`` for the positions ``(seq, pos)`` of ``logits [B, T, V]``.

    Forward arguments: ``logits`` ``[B, T, V]`` (any float dtype, with gradient); ``seq``, ``pos`` ``[P]`` long;
    ``support`` ``[P, S]`` long token ids (a padded slot repeats its row's first id); ``gold`` ``[P]`` long
    (``-1``: no gold token, output 0); ``temperature``; ``chunk`` positions per chunk.
    Returns ``[P, S]``, ``[P]``, ``[P]`` in float32 (float64 for float64 logits); the tail's log-mass is ``-inf``
    where the support covers the whole vocabulary.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        seq: torch.Tensor,
        pos: torch.Tensor,
        support: torch.Tensor,
        gold: torch.Tensor,
        temperature: float,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = _work_dtype(logits)
        p = seq.shape[0]
        lse_t = torch.empty(p, dtype=dtype, device=logits.device)
        lse_tail = torch.empty_like(lse_t)
        lse_1 = torch.empty_like(lse_t)
        support_lp = torch.empty(support.shape, dtype=dtype, device=logits.device)
        gold_logit = torch.empty_like(lse_t)
        rows = _Rows(logits, seq, pos)
        for start in range(0, p, chunk):
            c = slice(start, start + chunk)
            _forward_chunk(
                logits, rows, c, support[c], gold[c], temperature,
                (lse_t[c], lse_tail[c], lse_1[c], support_lp[c], gold_logit[c]),
            )
        has_gold = gold >= 0
        gold_lp = torch.where(has_gold, gold_logit - lse_1, torch.zeros_like(lse_1))
        ctx.save_for_backward(logits, seq, pos, support, gold, lse_t, lse_tail, lse_1, support_lp)
        ctx.temperature, ctx.chunk = temperature, chunk
        return support_lp, lse_tail - lse_t, gold_lp

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_support: torch.Tensor, g_tail: torch.Tensor, g_gold: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        logits, seq, pos, support, gold, lse_t, lse_tail, lse_1, support_lp = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        dtype = lse_t.dtype
        first = _first_of_id(support)
        g_support, g_tail = g_support.to(dtype) * first, g_tail.to(dtype)
        g_gold = torch.where(gold >= 0, g_gold.to(dtype), torch.zeros_like(lse_t))
        q_support = support_lp.exp()
        q_tail = (lse_tail - lse_t).exp()
        total = g_support.sum(dim=1) + g_tail
        if t == 1.0:
            total = total + g_gold  # p1 = q: the gold term's "- g_gold p1" joins "- G q"
        tail_coef = (g_tail - total * q_tail) / t
        support_grad = (g_support - total.unsqueeze(1) * q_support) / t
        support_grad = torch.where(first, support_grad, support_grad[:, :1])  # duplicates write the same value
        # an empty tail (-inf): any finite shift does, the tail's coefficient being 0 there
        shift = torch.where(torch.isfinite(lse_tail), lse_tail, torch.finfo(dtype).max).unsqueeze(1)
        grad = torch.zeros_like(logits)
        rows = _Rows(logits, seq, pos)
        for start in range(0, seq.shape[0], chunk):
            c = slice(start, start + chunk)
            block = rows.read(logits, c, dtype, t)
            # (q_v / q_tail) (g_tail - G q_tail) / T for the tail; every support slot is overwritten below
            block.sub_(shift[c]).clamp_max_(0.0).exp_().mul_(tail_coef[c].unsqueeze(1))
            block.scatter_(1, support[c], support_grad[c])
            if t == 1.0:
                block.scatter_add_(1, gold[c].clamp_min(0).unsqueeze(1), g_gold[c].unsqueeze(1))
            rows.write(grad, c, block)
            del block  # one [chunk, V] block at a time
            if t != 1.0 and bool((gold[c] >= 0).any()):
                block = rows.read(logits, c, dtype)  # g_gold (1[v = gold] - p1_v), p1 at T = 1
                block.sub_(lse_1[c].unsqueeze(1)).exp_().mul_(-g_gold[c].unsqueeze(1))
                block.scatter_add_(1, gold[c].clamp_min(0).unsqueeze(1), g_gold[c].unsqueeze(1))
                rows.write(grad, c, block, add=True)
                del block
        return grad, None, None, None, None, None, None


def _first_of_id(support: torch.Tensor) -> torch.Tensor:
    """``[P, S]`` bool: False at padded slots, which repeat their row's first id (so each id counts once)."""
    first = torch.ones_like(support, dtype=torch.bool)
    first[:, 1:] = support[:, 1:] != support[:, :1]
    return first


def _forward_chunk(
    logits: torch.Tensor,
    rows_of: _Rows,
    c: slice,
    support: torch.Tensor,
    gold: torch.Tensor,
    temperature: float,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Fill ``out = (lse_T, lse_tail, lse_1, log q[S], gold logit)`` for the positions of chunk ``c``.

    The tail's log-sum-exp is taken over the tokens outside the support only (their logits set to ``-inf``), and
    the full one adds the support's terms, computed from the gathered support logits: no ``1 - sum`` cancellation,
    so a tail of mass 1e-30 is as exact as one of mass 0.5. At T != 1 the log-sum-exp at temperature 1 comes from
    the same exponentials when T > 1, ``sum_v exp(z_v - T top) = sum_v exp(z_v / T - top) ** T`` (each term at most
    1, the largest exactly 1, and a term that underflowed only gets smaller), so the vocabulary is read once.
    """
    lse_t, lse_tail, lse_1, support_lp, gold_logit = out
    t = temperature
    rows = rows_of.read(logits, c, lse_t.dtype)
    gold_logit.copy_(rows.gather(1, gold.clamp_min(0).unsqueeze(1)).squeeze(1))
    _scaled_(rows, t)
    scaled = rows.gather(1, support)  # [c, S] z / T at the support ids
    rows.scatter_(1, support, float("-inf"))
    top = torch.maximum(rows.amax(dim=1), scaled.amax(dim=1)).unsqueeze(1)
    tail_sum = rows.sub_(top).exp_().sum(dim=1)
    support_terms = (scaled - top).exp_().mul_(_first_of_id(support))  # each id once
    lse_t.copy_(top.squeeze(1) + (tail_sum + support_terms.sum(dim=1)).log())
    lse_tail.copy_(top.squeeze(1) + tail_sum.log())  # -inf when the support covers every token
    support_lp.copy_(scaled - lse_t.unsqueeze(1))
    if t == 1.0:
        lse_1.copy_(lse_t)
    elif t > 1.0 and bool((gold >= 0).any()):
        powered = rows.pow_(t).sum(dim=1) + support_terms.pow_(t).sum(dim=1)
        lse_1.copy_(t * top.squeeze(1) + powered.log())
    elif bool((gold >= 0).any()):
        # below T = 1 the powers would lift terms that underflowed in exp(z / T - top): read the logits again
        del rows  # one [chunk, V] block at a time
        rows = rows_of.read(logits, c, lse_t.dtype)
        row_top = rows.amax(dim=1, keepdim=True)
        lse_1.copy_(row_top.squeeze(1) + rows.sub_(row_top).exp_().sum(dim=1).log_())
