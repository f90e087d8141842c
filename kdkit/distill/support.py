"""Combining the teachers' sparse top-k outputs on one support per position (DESIGN.md section 4).

For position ``p``, teacher ``i`` stores its top-k token ids ``K_ip`` and their probabilities at the distillation
temperature. The support of ``p`` is ``S_p = union_i K_ip`` plus one **tail** bucket standing for every other token.
Teacher ``i``'s distribution on ``S_p + tail``:

* its stored probability on each token of ``K_ip``;
* its missing mass ``m_ip = 1 - sum_{K_ip} p_i`` spread uniformly over the ``V - k`` tokens outside its top-k:
  each token of ``S_p \\ K_ip`` gets ``m_ip / (V - k)``, and the tail bucket, which holds the ``V - |S_p|`` tokens
  outside the support, gets ``m_ip (V - |S_p|) / (V - k)``.

Every row sums to 1, and with ``k = V`` (every teacher lists every token) the support is the vocabulary and the
tail is empty: the computation is the dense one. Everything is vectorised over positions and teachers: the union
is one sort of the ``N k`` ids of each position, and the sort's permutation says where each teacher's ids went.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdkit.plugin.batch import LOG_FLOOR, REST


@dataclass
class Support:
    """The supports of ``P`` positions and the teachers' distributions on them (``S`` = the largest ``|S_p|``).

    * ``ids`` ``[P, S]`` long: the token ids of ``S_p`` in increasing order; a padded slot (``s >= |S_p|``)
      repeats the row's first id, so that gathers and scatters with it stay in range and are harmless;
    * ``valid`` ``[P, S]`` bool: ``False`` at padded slots;
    * ``size`` ``[P]`` long: ``|S_p|``;
    * ``teacher_log_probs`` ``[P, N, S + 1]``: each teacher's log-probabilities on ``S_p`` then the tail (last
      column); padded slots and an empty tail hold :data:`LOG_FLOOR` (probability 0).
    """

    ids: torch.Tensor
    valid: torch.Tensor
    size: torch.Tensor
    teacher_log_probs: torch.Tensor

    @property
    def slots(self) -> int:
        """``S + 1``: the support's slots per position, the tail included."""
        return self.ids.shape[1] + 1

    def slot_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[P]`` the slot of ``tokens [P]`` in each position's support: its index in ``ids``, or ``S`` (the tail)
        for a token outside ``S_p``."""
        sentinel = torch.where(self.valid, self.ids, torch.iinfo(self.ids.dtype).max)
        index = torch.searchsorted(sentinel, tokens.unsqueeze(1)).squeeze(1).clamp_max(self.ids.shape[1] - 1)
        at = index.unsqueeze(1)
        found = self.valid.gather(1, at).squeeze(1) & (self.ids.gather(1, at).squeeze(1) == tokens)
        return torch.where(found, index, torch.full_like(index, self.ids.shape[1]))

    def class_ids(self) -> torch.Tensor:
        """``[P, S + 1]``: the vocabulary id of each slot, :data:`kdkit.plugin.batch.REST` for the tail, ``-1``
        for a padded slot (:class:`kdkit.KDBatch`'s ``class_ids``, of ``V`` classes)."""
        ids = torch.where(self.valid, self.ids, torch.full_like(self.ids, -1))
        return torch.cat([ids, torch.full_like(ids[:, :1], REST)], dim=1)


def _union(ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(support ids [P, S] sorted, padded with vocab_size, valid [P, S], size [P], slots [P, N, k])``: the union
    of each position's ``N k`` ids and where each teacher's ids sit in it."""
    p, n, k = ids.shape
    if k == vocab_size:  # every teacher lists every token: the support is the vocabulary, slot v is token v
        support = torch.arange(vocab_size, device=ids.device).expand(p, vocab_size)
        valid = torch.ones(p, vocab_size, dtype=torch.bool, device=ids.device)
        return support, valid, torch.full((p,), vocab_size, device=ids.device), ids
    flat, order = ids.reshape(p, n * k).sort(dim=1)
    new = torch.ones_like(flat, dtype=torch.bool)
    new[:, 1:] = flat[:, 1:] != flat[:, :-1]
    size = new.sum(dim=1)
    width = int(size.max()) if p else 1
    slot_of_sorted = new.cumsum(dim=1) - 1
    support = torch.full((p, width), vocab_size, dtype=flat.dtype, device=ids.device)
    support.scatter_(1, slot_of_sorted, flat)  # duplicates write the same id to the same slot
    valid = torch.arange(width, device=ids.device).unsqueeze(0) < size.unsqueeze(1)
    slots = torch.empty_like(slot_of_sorted).scatter_(1, order, slot_of_sorted)  # back to the teachers' order
    return support, valid, size, slots.reshape(p, n, k)


def combine_supports(ids: torch.Tensor, log_probs: torch.Tensor, vocab_size: int) -> Support:
    """The support of each position and every teacher's distribution on it (the module docstring's rules).

    :param ids: ``[P, N, k]`` each teacher's top-k token ids (distinct within a teacher's row).
    :param log_probs: ``[P, N, k]`` their log-probabilities at the distillation temperature (any float dtype).
    :param vocab_size: ``V``.
    """
    ids = ids.long()
    p, n, k = ids.shape
    sorted_ids, valid, size, slots = _union(ids, vocab_size)
    work = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    log_probs = log_probs.to(work).clamp_min(LOG_FLOOR)
    missing = (1.0 - log_probs.exp().sum(dim=-1)).clamp_min(0.0)  # [P, N] m_ip (rounding can dip below 0)
    outside = vocab_size - k
    if outside > 0:
        each = missing / outside  # the share of one token outside a teacher's top-k
        tail = each * (vocab_size - size).unsqueeze(1).to(work)
    else:  # k = V: nothing is missing but rounding, and there is no token outside the support
        each = torch.zeros_like(missing)
        tail = torch.zeros_like(missing)
    width = sorted_ids.shape[1]
    teacher_lp = torch.empty(p, n, width + 1, dtype=work, device=ids.device)
    body = teacher_lp[:, :, :width]
    body.copy_(torch.log(each).clamp_min(LOG_FLOOR).unsqueeze(-1).expand(p, n, width))
    body.masked_fill_(~valid.unsqueeze(1), LOG_FLOOR)
    body.scatter_(2, slots, log_probs)  # the stored values where a teacher listed the token
    teacher_lp[:, :, width] = torch.log(tail).clamp_min(LOG_FLOOR)
    padded_ids = torch.where(valid, sorted_ids, sorted_ids[:, :1])
    return Support(padded_ids, valid, size, teacher_lp)
