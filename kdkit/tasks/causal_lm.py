"""Causal LMs distilled token by token (``task = "causal-lm"``): the task seam's second implementation.

What differs from sequence classification, stage by stage (docs/PIPELINE.md, "Causal LMs"):

* **data**: documents, prompt / completion pairs or chat conversations (:mod:`kdkit.data.lm`), split the paper's
  way; an unlabeled row keeps only its prompt;
* **teachers**: given checkpoints, or fine-tuned from one base (a checkpoint, or a fresh model from a config
  table) with the next-token cross-entropy on the labeled rows, one per seed, through the same ``fit`` as
  classifiers;
* **teacher outputs**: the continuations the teachers write for the unlabeled prompts and every teacher's top-k
  store of every split (:mod:`kdkit.tasks.lm_outputs`);
* **students**: :class:`kdkit.TokenDistillationLoss` over the stores, read by content key per batch
  (:class:`kdkit.training.causal_lm.StoreDistillation`); the labels-only student minimises the next-token
  cross-entropy of the labeled positions;
* **evaluation**: perplexity (``exp`` of the mean negative log-likelihood of the gold tokens of the eval split's
  target positions; lower is better) and next-token accuracy (the share of those positions whose most probable
  token is the gold one), for each teacher and the ensemble (from the eval stores) and each student.

Scores are ``[P, 2]`` float64 tensors, one row per target position of the eval split (sequence order, then
position order): the gold token's log-probability at temperature 1 and 1.0 where it is the first choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.data.lm import lm_format, load_lm_splits
from kdkit.data.splits import Splits
from kdkit.data.tokens import Encoding, TokenSequences, encode_split
from kdkit.distill.loss import check_plugins_accept
from kdkit.distill.tokens import TokenDistillationLoss
from kdkit.errors import ModelError
from kdkit.modeling.causal_lm import load_causal_lm, score_sequences
from kdkit.modeling.generate import Sampling
from kdkit.modeling.refs import check_weights
from kdkit.modeling.tokenize import tokenizer_fingerprint
from kdkit.plugin.batch import IGNORE_INDEX
from kdkit.plugin.registry import PluginRegistry
from kdkit.recipe.schema import DataConfig, GenerationSettings, Recipe, TokensConfig
from kdkit.tasks.base import StudentSets
from kdkit.tasks.lm_outputs import CausalLMSettings, LMEvalOutputs, LMOutputStore, sample_prompts, write_samples
from kdkit.training.causal_lm import CausalLMCollator, CausalLMObjective, StoreDistillation, TokenDataset
from kdkit.training.objectives import Objective

#: Metrics of a causal-LM run, in table order.
METRICS = ["perplexity", "accuracy"]
#: Support slots of the made-up batch that checks the plugins (a position's support plus its tail).
_CHECK_SLOTS = 5


def lm_metrics(scores: torch.Tensor) -> dict[str, float]:
    """``perplexity`` and next-token ``accuracy`` of scores ``[P, 2]``."""
    if scores.numel() == 0:
        raise ValueError("no target position to evaluate")
    return {"perplexity": math.exp(-float(scores[:, 0].double().mean())), "accuracy": float(scores[:, 1].double().mean())}


@dataclass
class StoreSet:
    """What the distillation objective reads: per teacher, its stores of the training splits, and the content key of
    each training sequence (by ``kd_index``)."""

    stores: list[list[Any]]
    keys: list[str]


def settings_of(recipe: Recipe) -> CausalLMSettings:
    """The causal-LM settings of a recipe (generation defaults where ``teachers.generation`` is absent)."""
    data = recipe.data
    generation = recipe.teachers.generation or GenerationSettings()
    sampling = Sampling(
        max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample, temperature=generation.temperature,
        top_k=generation.top_k, top_p=generation.top_p, seed=generation.seed,
    )
    encoding = Encoding(lm_format(data), data.max_length, data.overflow, data.prompt_tokens)
    tokens = recipe.tokens or TokensConfig()
    return CausalLMSettings(
        encoding=encoding, sampling=sampling, generation_batch_size=generation.batch_size, top_k=tokens.top_k,
        store_dtype=tokens.store_dtype, temperature=recipe.distill.temperature,
        tokens=tokens.model_dump(mode="json"),
    )


class CausalLM:
    """The causal-LM task, configured by one recipe (:func:`settings_of`)."""

    name = "causal-lm"

    def __init__(self, settings: CausalLMSettings | None = None) -> None:
        self.settings = settings or CausalLMSettings(encoding=Encoding("text", 128))

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> CausalLM:
        return cls(settings_of(recipe))

    # ----------------------------------------------------------------- data
    def load_splits(self, cfg: DataConfig, need_unlabeled: bool) -> Splits:
        return load_lm_splits(cfg, need_unlabeled=need_unlabeled)

    def distillation_loss(self, recipe: Recipe, registry: PluginRegistry) -> TokenDistillationLoss:
        tokens = recipe.tokens or TokensConfig()
        return TokenDistillationLoss.from_plugins(
            recipe.enabled_plugins(), registry=registry, temperature=recipe.distill.temperature, on=recipe.distill.on,
            divergence=tokens.divergence, beta=tokens.beta,
        )

    def check_plugins(self, loss_fn: Any, num_teachers: int, splits: Splits, *, unlabeled: bool) -> None:
        """The plugins on a made-up batch whose classes are a position's support slots."""
        check_plugins_accept(loss_fn.weighting, num_teachers, _CHECK_SLOTS, unlabeled=unlabeled)

    def data_settings(self) -> dict[str, Any]:
        """How rows become token sequences (teachers learn from them)."""
        e = self.settings.encoding
        return {"lm": {"format": e.format, "overflow": e.overflow, "prompt_tokens": e.prompt_tokens}}

    def distill_settings(self) -> dict[str, Any]:
        """How the teachers continue the unlabeled prompts (the distilled student learns from that text) and the
        [tokens] table (what is kept of the teachers, and the divergence)."""
        return {"generation": dataclasses.asdict(self.settings.sampling), "tokens": self.settings.tokens}

    # ----------------------------------------------------------------- models
    def load_model(
        self,
        resolved: str,
        *,
        label_names: Sequence[str] = (),
        who: str,
        num_layers: int | None = None,
        trust_remote_code: bool = False,
        fine_tuned: bool = False,
        pooling: str | None = None,
        keep_layers: Sequence[int] | None = None,
        config: dict[str, Any] | None = None,
    ) -> Any:
        """A causal LM (:func:`kdkit.modeling.causal_lm.load_causal_lm`); a saved (fine-tuned) one loads as is."""
        if fine_tuned:
            return load_causal_lm(resolved, who=who, trust_remote_code=trust_remote_code)
        return load_causal_lm(
            resolved, who=who, num_layers=num_layers, keep_layers=keep_layers, config=config,
            trust_remote_code=trust_remote_code,
        )

    def check_checkpoint(self, resolved: str, *, who: str, label_names: Sequence[str], trust_remote_code: bool) -> None:
        """A given teacher must hold weights (its tokenizer is checked against the others' in stage 3)."""
        check_weights(resolved, who)

    def encode(
        self, tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int, store: Any = None
    ) -> TokenSequences:
        """The split's token sequences (rows with their completions). ``store`` is not read: a causal LM's
        sequences are kept with its teachers' outputs (:mod:`kdkit.store.sequences`) instead of the token store."""
        return encode_split(tokenizer, dataset, text_columns, self._encoding(max_length), split="data", prompts=False)

    def train_dataset(
        self, tokenizer: Any, split: Any, text_columns: Sequence[str], max_length: int, *, name: str = "labeled",
        tokens: TokenSequences | None = None,
    ) -> TokenDataset:
        """The split's token sequences (``tokens`` when encoded already), every labeled position a target."""
        if tokens is None:
            tokens = encode_split(tokenizer, split, text_columns, self._encoding(max_length), split=name, prompts=False)
        return TokenDataset(tokens)

    def collator(self, tokenizer: Any) -> CausalLMCollator:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return CausalLMCollator(int(pad or 0), pad_to_multiple_of=8 if torch.cuda.is_available() else None)

    def _encoding(self, max_length: int) -> Encoding:
        e = self.settings.encoding
        return Encoding(e.format, max_length, e.overflow, e.prompt_tokens)

    # ----------------------------------------------------------------- teacher outputs
    def output_store(self, cache_dir: str | Path, *, batch_size: int, console: Any = None) -> LMOutputStore:
        return LMOutputStore(cache_dir, self.settings, batch_size=batch_size, console=console)

    def ensemble(self, teacher_outputs: LMEvalOutputs) -> torch.Tensor:
        return teacher_outputs.ensemble

    def teacher_scores(self, eval_outputs: LMEvalOutputs, index: int) -> torch.Tensor:
        return eval_outputs.scores[:, index]

    # ----------------------------------------------------------------- students
    def objective(self, teacher_outputs: StoreSet | None = None, loss_fn: Any = None) -> Objective:
        """The next-token cross-entropy, or ``loss_fn`` over the stores of ``teacher_outputs``."""
        if loss_fn is None:
            return CausalLMObjective()
        assert teacher_outputs is not None
        return StoreDistillation(teacher_outputs.stores, teacher_outputs.keys, loss_fn)

    def student_sets(
        self, tokenizer: Any, splits: Splits, outputs: Mapping[str, Any], *, max_length: int, need_unlabeled: bool,
        early_stopping: bool, store: Any = None,
    ) -> StudentSets:
        """The labeled sequences (and the unlabeled ones, prompt + continuation) with the teachers' stores of both;
        the labeled sequences alone for the baseline. The tokenizer must be the stores' (checked on first read)."""
        labeled = outputs["labeled"]
        parts = [labeled]
        if need_unlabeled:
            parts.append(outputs["unlabeled"])
        sequences = TokenSequences.concat([p.sequences for p in parts])
        stores = [[p.stores[i] for p in parts] for i in range(len(labeled.stores))]
        _check_student_tokenizer(tokenizer, stores)
        tune = None
        if early_stopping and splits.tune is not None:
            tune = self.train_dataset(tokenizer, splits.tune, splits.text_columns, max_length, name="tune")
        return StudentSets(
            distill=TokenDataset(sequences, kd_offset=0),
            distill_outputs=StoreSet(stores, sequences.keys),
            baseline=TokenDataset(labeled.sequences),
            tune=tune,
        )

    def eval_inputs(self, splits: Splits, outputs: Mapping[str, Any]) -> TokenSequences:
        """The eval split's token sequences (the ones the teachers' eval stores hold)."""
        return outputs["eval"].sequences

    def prediction_shape(self, eval_inputs: TokenSequences, label_names: Sequence[str]) -> tuple[int, int]:
        return sum(int(t[1:].sum()) for t in eval_inputs.targets), 2

    def predict(
        self, model: Any, tokenizer: Any, dataset: TokenSequences, text_columns: Sequence[str], max_length: int,
        batch_size: int, **kwargs: Any,
    ) -> torch.Tensor:
        """``[P, 2]`` scores of ``model`` on the eval sequences."""
        return score_sequences(model, dataset, batch_size=batch_size, device=kwargs.get("device"),
                               who=kwargs.get("who", "model"))  # fmt: skip

    def samples(self, model: Any, tokenizer: Any, eval_inputs: TokenSequences) -> list[dict[str, str]]:
        prompts = sample_prompts(eval_inputs, self.settings.encoding)
        return write_samples(model, tokenizer, prompts, self.settings.sampling, self.settings.encoding.max_length)

    # ----------------------------------------------------------------- metrics
    def metrics(self, scores: torch.Tensor, labels: Any = None) -> dict[str, float]:
        """Perplexity and next-token accuracy; ``labels`` is unused (the gold tokens are in the scores)."""
        return lm_metrics(scores)

    def metric_names(self, num_classes: int = 0) -> list[str]:
        return list(METRICS)

    def tune_metrics(self, prediction: Any) -> dict[str, float]:
        """Early stopping's figures from the Trainer's ``[rows, L, 2]`` predictions and ``[rows, L]`` labels."""
        predictions = torch.as_tensor(prediction.predictions).reshape(-1, 2)
        labels = torch.as_tensor(prediction.label_ids).reshape(-1)
        return lm_metrics(predictions[labels != IGNORE_INDEX].double())

    def degenerate(self, scores: torch.Tensor, label_names: Sequence[str]) -> str | None:
        """What is degenerate about a model's eval scores: none is flagged for a language model."""
        return None


def _check_student_tokenizer(tokenizer: Any, stores: Sequence[Sequence[Any]]) -> None:
    """The student must tokenize as the teachers did: its fingerprint against the stores' manifests."""
    mine = tokenizer_fingerprint(tokenizer)
    stored = stores[0][0].manifest.tokenizer
    if mine != stored:
        raise ModelError(
            f"student: its tokenizer differs from the teachers' (fingerprint {mine[:12]} against {stored[:12]}); "
            "token-level distillation needs one tokenizer for every teacher and the student"
        )
