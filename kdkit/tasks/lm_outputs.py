"""The teachers' outputs of a causal-LM run, computed once and kept: the continuations they write for unlabeled
prompts, and every teacher's top-k store over every split's token sequences.

Per run (stage 3), in this order:

1. **One tokenizer.** Every teacher's tokenizer must have one fingerprint
   (:func:`kdkit.modeling.tokenize.tokenizer_fingerprint`) and every teacher one vocabulary size; the student's is
   checked against the stores' manifests when it trains. The splits become token sequences
   (:mod:`kdkit.data.tokens`).
2. **Continuations** of the unlabeled prompts, **round-robin over the teachers**: the distinct prompts, ordered by
   content key, go to teacher 1, 2, ..., N, 1, 2, ... Each prompt is continued once, by one teacher, with its own
   random stream (:mod:`kdkit.modeling.generate`). Why not sample from the mixture of the teachers at every token:
   that needs all N teachers in memory and a forward pass of each per generated token (N times the cost, and
   no batched KV cache across models), while round-robin costs one teacher's generation per prompt with one model
   loaded at a time; and sequence-level distillation needs plausible text to put the student's positions on, not
   the ensemble's own samples: the ensemble's distribution enters at every position of that text through the
   stores, whichever teacher wrote it. Each teacher's continuations are one entry
   ``<cache_dir>/generated/<key>/`` (:mod:`kdkit.store.sequences`), keyed by the teacher's key, the tokenizer,
   the set of its prompts (their content keys), the sampling settings, ``max_length`` and the end-of-sequence
   token: a killed run keeps the teachers that finished.
3. **Top-k stores** ``<cache_dir>/topk/<key>/`` (:mod:`kdkit.store.topk`), one per (teacher, split), keyed by the
   teacher, the tokenizer, k, temperature, dtype, ``max_length``, the vocabulary and the sequences' content keys
   (for the unlabeled split: prompt and continuation). The labeled and unlabeled splits are stored at the
   distillation temperature, the eval split at temperature 1 (it is only evaluated on: perplexity, next-token
   accuracy and the ensemble's first choice need the teachers' own distributions). A teacher model is loaded
   only when one of its entries is missing.
4. **Eval scores** of each teacher and of the ensemble from the eval stores, and a few seeded **samples** of each
   teacher (kept in ``<cache_dir>/samples/<key>.json``).

The ensemble's perplexity is exact: the mixture's probability of the gold token is the mean of the teachers'
exact stored ones. Its first choice is taken on the union of the teachers' top-k, each teacher's mass outside its
top-k spread evenly (:func:`kdkit.distill.support.combine_supports`, DESIGN.md section 4): exact when the mixture's
arg-max is in every teacher's top-k, which a top-k of a few dozen tokens almost always holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.data.tokens import Encoding, TokenSequences, encode_split
from kdkit.distill.support import combine_supports
from kdkit.errors import ModelError
from kdkit.modeling.causal_lm import batch_token_budget, load_causal_lm
from kdkit.modeling.generate import Sampling, generate_continuations
from kdkit.modeling.loading import load_config, load_tokenizer
from kdkit.modeling.tokenize import tokenizer_fingerprint
from kdkit.modeling.topk import build_topk_store
from kdkit.runtime import default_device, warn
from kdkit.store.files import atomic_write_json, read_json, remove_stale_temporaries
from kdkit.store.hashing import hash_json
from kdkit.store.locks import file_lock
from kdkit.store.logits import CacheWarning
from kdkit.store.sequences import read_sequences, write_sequences
from kdkit.store.topk import TopKSpec, TopKStore, TopKStoreError, key_set_hash, sequence_key, store_key
from kdkit.tasks.base import TeacherRef
from kdkit.tasks.logit_cache import CacheEntry, _progress

#: Format of the generated-continuation and sample entries (part of their keys).
OUTPUTS_FORMAT = 1
#: Seeded samples of each model in the results: this many eval prompts, continued by at most this many tokens.
SAMPLE_COUNT = 3
SAMPLE_TOKENS = 32


@dataclass(frozen=True)
class CausalLMSettings:
    """What shapes a causal-LM run's sequences and teacher outputs, from its recipe."""

    encoding: Encoding
    sampling: Sampling = Sampling()
    generation_batch_size: int = 32
    top_k: int = 64
    store_dtype: str = "float16"
    temperature: float = 1.0
    tokens: dict[str, Any] = field(default_factory=dict)  #: the recipe's [tokens] table (keys distilled students)


@dataclass
class LMSplitOutputs:
    """One split's token sequences and each teacher's top-k store over them (teacher order)."""

    sequences: TokenSequences
    stores: list[TopKStore]


@dataclass
class LMEvalOutputs(LMSplitOutputs):
    """The eval split's outputs with the scores read from its stores (target positions in sequence order)."""

    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, 2))  #: ``[P, N, 2]`` per teacher
    ensemble: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2))  #: ``[P, 2]``


def sample_prompts(sequences: TokenSequences, encoding: Encoding, count: int = SAMPLE_COUNT) -> list[np.ndarray]:
    """The prompts of the first ``count`` sequences: the tokens before the first target (a prompt, a chat's
    generation prompt), or for plain text the first ``prompt_tokens`` tokens."""
    prompts = []
    for ids, targets in zip(sequences.ids[:count], sequences.targets[:count], strict=True):
        first = int(np.argmax(targets)) if targets.any() else len(ids)
        cut = first if first > 1 else min(encoding.prompt_tokens, len(ids) - 1)
        prompts.append(ids[: max(cut, 1)])
    return prompts


def write_samples(
    model: Any, tokenizer: Any, prompts: Sequence[np.ndarray], sampling: Sampling, max_length: int
) -> list[dict[str, str]]:
    """``{"prompt", "continuation"}`` texts of ``model``'s seeded continuations of ``prompts``."""
    short = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, SAMPLE_TOKENS))
    keys = [sequence_key(p) for p in prompts]
    eos = getattr(tokenizer, "eos_token_id", None)
    continued = generate_continuations(model, list(prompts), keys, short, eos=eos, max_length=max_length)
    return [
        {"prompt": tokenizer.decode(p.tolist()), "continuation": tokenizer.decode(c.tolist())}
        for p, c in zip(prompts, continued, strict=True)
    ]


class _Teacher:
    """A teacher's model, loaded on first use and freed at the end of the block."""

    def __init__(self, teacher: TeacherRef, device: torch.device) -> None:
        self.teacher, self.device, self._model = teacher, device, None

    def model(self) -> Any:
        if self._model is None:
            t = self.teacher
            self._model = load_causal_lm(t.path, who=t.name, trust_remote_code=t.trust_remote_code).to(self.device)
        return self._model

    def free(self) -> None:
        if self._model is not None:
            self._model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class LMOutputStore:
    """The teacher-output store of causal-LM runs under ``<cache_dir>`` (module docstring).

    :param batch_size: sequences per forward pass when building stores (``teachers.eval_batch_size``).
    """

    what = "teacher-output entries (continuations and top-k stores)"  #: how the stage's summary line names them

    def __init__(
        self, cache_dir: str | Path, settings: CausalLMSettings, *, batch_size: int = 64, console: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self.root = Path(cache_dir)
        self.directory = self.root / "topk"
        self.settings = settings
        self.batch_size = batch_size
        self.console = console
        self.device = device
        self.entries: list[CacheEntry] = []  #: what the last call read or built
        self.samples: dict[str, list[dict[str, str]]] = {}  #: teacher name -> seeded samples

    # ----------------------------------------------------------------- the whole stage
    def teacher_logits(
        self,
        teachers: Sequence[TeacherRef],
        splits: Mapping[str, Any],
        text_columns: Sequence[str],
        label_names: Sequence[str],
        *,
        max_length: int,
    ) -> dict[str, LMSplitOutputs]:
        """``{split: LMSplitOutputs}`` for the labeled, unlabeled (if given) and eval splits (the tune split is
        only evaluated on by early stopping, which scores the student itself); ``label_names`` is unused."""
        self.entries, self.samples = [], {}
        tokenizer, fingerprint = self._shared_tokenizer(teachers)
        vocab = self._vocab_size(teachers)
        encoding = dataclasses.replace(self.settings.encoding, max_length=max_length)
        sequences = {
            name: encode_split(tokenizer, ds, text_columns, encoding, split=name, prompts=False)
            for name, ds in splits.items()
            if name in ("labeled", "eval")
        }
        if "unlabeled" in splits:
            prompts = encode_split(tokenizer, splits["unlabeled"], text_columns, encoding, split="unlabeled", prompts=True)
            sequences["unlabeled"] = self._continued(teachers, tokenizer, fingerprint, prompts, max_length)
        stores: dict[str, list[TopKStore]] = {name: [] for name in sequences}
        device = self.device or default_device()
        for teacher in teachers:
            loaded = _Teacher(teacher, device)
            try:
                for name, seqs in sequences.items():
                    spec = self._spec(teacher, fingerprint, vocab, max_length, evaluation=name == "eval")
                    stores[name].append(self._store(loaded, name, seqs, spec, device))
                self.samples[teacher.name] = self._samples(loaded, tokenizer, fingerprint, sequences["eval"], max_length)
            finally:
                loaded.free()
        out: dict[str, LMSplitOutputs] = {
            name: LMSplitOutputs(seqs, stores[name]) for name, seqs in sequences.items() if name != "eval"
        }
        out["eval"] = eval_outputs(sequences["eval"], stores["eval"], vocab)
        return out

    # ----------------------------------------------------------------- checks
    def _shared_tokenizer(self, teachers: Sequence[TeacherRef]) -> tuple[Any, str]:
        first, fingerprint = None, ""
        for teacher in teachers:
            tokenizer = load_tokenizer(teacher.path, who=teacher.name, trust_remote_code=teacher.trust_remote_code)
            mine = tokenizer_fingerprint(tokenizer)
            if first is None:
                first, fingerprint = tokenizer, mine
            elif mine != fingerprint:
                raise ModelError(
                    f"{teacher.name}: its tokenizer differs from {teachers[0].name}'s (fingerprint {mine[:12]} against "
                    f"{fingerprint[:12]}); token-level distillation needs one tokenizer for every teacher and the student"
                )
        return first, fingerprint

    def _vocab_size(self, teachers: Sequence[TeacherRef]) -> int:
        sizes = {}
        for teacher in teachers:
            config = load_config(teacher.path, who=teacher.name, trust_remote_code=teacher.trust_remote_code)
            sizes[teacher.name] = int(config.vocab_size)
        if len(set(sizes.values())) > 1:
            raise ModelError(f"the teachers' vocabularies differ in size ({sizes}); they must share one tokenizer")
        return next(iter(sizes.values()))

    def _spec(self, teacher: TeacherRef, fingerprint: str, vocab: int, max_length: int, *, evaluation: bool) -> TopKSpec:
        settings = self.settings
        return TopKSpec(
            teacher=teacher.key, tokenizer=fingerprint, k=min(settings.top_k, vocab),
            temperature=1.0 if evaluation else settings.temperature, dtype=settings.store_dtype,  # type: ignore[arg-type]
            max_length=max_length, vocab_size=vocab,
        )

    def _warn(self, message: str) -> None:
        warnings.warn(message, CacheWarning, stacklevel=3)
        warn(self.console, message)

    # ----------------------------------------------------------------- continuations
    def _continued(
        self, teachers: Sequence[TeacherRef], tokenizer: Any, fingerprint: str, prompts: TokenSequences, max_length: int
    ) -> TokenSequences:
        """The unlabeled sequences: each prompt followed by the continuation its teacher (round-robin) wrote."""
        keys = prompts.keys
        prompt_of = dict(zip(keys, prompts.ids, strict=True))
        unique = sorted(prompt_of)
        written: dict[str, np.ndarray] = {}
        for index, teacher in enumerate(teachers):
            mine = unique[index :: len(teachers)]
            if mine:
                written.update(self._generated(teacher, tokenizer, fingerprint, mine, prompt_of, max_length))
        out = TokenSequences()
        for ids, key, row in zip(prompts.ids, keys, prompts.rows, strict=True):
            new = written[key]
            out.add(np.concatenate([ids, new]), [False] * (len(ids) + len(new)), row,
                    generated=[False] * len(ids) + [True] * len(new))  # fmt: skip
        return out

    def _generated(
        self, teacher: TeacherRef, tokenizer: Any, fingerprint: str, keys: list[str],
        prompt_of: Mapping[str, np.ndarray], max_length: int,
    ) -> dict[str, np.ndarray]:
        """``teacher``'s continuations of the prompts ``keys``: read from the cache, or generated and kept."""
        eos = getattr(tokenizer, "eos_token_id", None)
        sampling = self.settings.sampling
        key = hash_json(
            {"kind": "generated", "format": OUTPUTS_FORMAT, "teacher": teacher.key, "tokenizer": fingerprint,
             "prompts": key_set_hash(keys), "sampling": dataclasses.asdict(sampling), "max_length": max_length,
             "eos": eos},
            length=32,
        )  # fmt: skip
        directory = self.root / "generated" / key
        with file_lock(directory.with_name(f"{key}.lock")):
            found = read_sequences(directory)
            if found is not None and set(found) == set(keys):
                self.entries.append(CacheEntry(teacher.name, "unlabeled (generated)", directory, built=False))
                return found
            if directory.exists():
                self._warn(f"generated continuations {key} ({teacher.name}) are unusable; generating them again")
            remove_stale_temporaries(directory.parent, key)
            loaded = _Teacher(teacher, self.device or default_device())
            try:
                with _progress(self.console) as progress:
                    task = progress.add_task(f"{teacher.name}: generating", total=len(keys)) if progress else None
                    written = generate_continuations(
                        loaded.model(), [prompt_of[k] for k in keys], keys, sampling, eos=eos, max_length=max_length,
                        batch_size=self.settings.generation_batch_size, device=loaded.device,
                        on_batch=(lambda n: progress.advance(task, n)) if progress else None,
                    )
            finally:
                loaded.free()
            continuations = dict(zip(keys, written, strict=True))
            write_sequences(directory, continuations)
            self.entries.append(CacheEntry(teacher.name, "unlabeled (generated)", directory, built=True))
            return continuations

    # ----------------------------------------------------------------- stores and samples
    def _store(
        self, loaded: _Teacher, split: str, sequences: TokenSequences, spec: TopKSpec, device: torch.device
    ) -> TopKStore:
        teacher = loaded.teacher
        directory = self.directory / store_key(spec, sequences.keys)
        with contextlib.suppress(TopKStoreError):
            store = TopKStore.open(directory, expect=spec)
            self.entries.append(CacheEntry(teacher.name, split, directory, built=False))
            return store
        with _progress(self.console) as progress:
            task = progress.add_task(f"{teacher.name}: {split}", total=len(set(sequences.keys))) if progress else None
            result = build_topk_store(
                loaded.model(), sequences.ids, self.directory, spec, keys=sequences.keys, batch_size=self.batch_size,
                max_tokens=batch_token_budget(device, spec.vocab_size), device=device, who=teacher.name,
                console=self.console, on_batch=(lambda n: progress.advance(task, n)) if progress else None,
            )
        self.entries.append(CacheEntry(teacher.name, split, directory, built=result.built))
        return result.store

    def _samples(
        self, loaded: _Teacher, tokenizer: Any, fingerprint: str, evaluation: TokenSequences, max_length: int
    ) -> list[dict[str, str]]:
        """The teacher's seeded samples on the first eval prompts, kept beside its stores."""
        prompts = sample_prompts(evaluation, self.settings.encoding)
        key = hash_json(
            {"kind": "samples", "format": OUTPUTS_FORMAT, "teacher": loaded.teacher.key, "tokenizer": fingerprint,
             "prompts": [sequence_key(p) for p in prompts], "sampling": dataclasses.asdict(self.settings.sampling),
             "tokens": SAMPLE_TOKENS, "max_length": max_length},
            length=32,
        )  # fmt: skip
        path = self.root / "samples" / f"{key}.json"
        with contextlib.suppress(OSError, ValueError, TypeError):
            found = read_json(path)
            if isinstance(found, list) and all(isinstance(s, dict) for s in found):
                return found
        samples = write_samples(loaded.model(), tokenizer, prompts, self.settings.sampling, max_length)
        atomic_write_json(path, samples)
        return samples


def eval_outputs(sequences: TokenSequences, stores: Sequence[TopKStore], vocab_size: int) -> LMEvalOutputs:
    """The teachers' and the ensemble's scores ``(gold log-probability, first choice is gold)`` at every target
    position of the eval sequences, read from the eval stores (temperature 1)."""
    targets = np.concatenate([t[1:] for t in sequences.targets] + [np.zeros(0, dtype=bool)])
    gold = torch.from_numpy(np.concatenate([ids[1:] for ids in sequences.ids] + [np.zeros(0, np.int32)])[targets])
    keep = torch.from_numpy(targets)
    rows = [store.read(sequences.keys) for store in stores]
    ids = torch.stack([r.ids[keep] for r in rows], dim=1)  # [P, N, k]
    log_probs = torch.stack([r.logprobs[keep] for r in rows], dim=1).double()
    gold_lp = torch.stack([r.gold[keep] for r in rows], dim=1).double()  # [P, N]
    hits = (ids[:, :, 0] == gold.long().unsqueeze(1)).double()
    scores = torch.stack([gold_lp, hits], dim=-1)
    mixture_lp = torch.logsumexp(gold_lp, dim=1) - math.log(len(stores))
    if len(gold):
        support = combine_supports(ids, log_probs, vocab_size)
        mixture = support.teacher_log_probs[:, :, :-1].exp().mean(dim=1).masked_fill(~support.valid, -1.0)
        first = support.ids.gather(1, mixture.argmax(dim=1, keepdim=True)).squeeze(1)
        ensemble = torch.stack([mixture_lp, (first == gold.long()).double()], dim=1)
    else:
        ensemble = torch.zeros(0, 2, dtype=torch.float64)
    return LMEvalOutputs(sequences, list(stores), scores=scores, ensemble=ensemble)


__all__ = [
    "CausalLMSettings",
    "LMEvalOutputs",
    "LMOutputStore",
    "LMSplitOutputs",
    "eval_outputs",
    "sample_prompts",
    "write_samples",
]
