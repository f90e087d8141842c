"""Loading tokenizers, configs and sequence-classification models, with errors that name the model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pickle import UnpicklingError  # the exception only: kdkit never unpickles anything itself
from typing import Any

from kdkit.data.labels import label_mismatch
from kdkit.errors import KdkitWarning, ModelError
from kdkit.modeling.pooling import POOLING_KEY, use_mean_pooling
from kdkit.modeling.refs import check_weights, is_local


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
        warnings.warn(f"{who}: trust_remote_code is on: code from '{resolved}' will run", KdkitWarning, stacklevel=2)
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
    mismatch = label_mismatch(label_names, names)
    if mismatch is not None:
        if mismatch.reordered:
            raise ModelError(
                f"{who}: label order {mismatch.got} differs from the data's {mismatch.expected}; "
                "re-export the checkpoint with the data's label ids or reorder data.label_names"
            )
        raise ModelError(f"{who}: labels {mismatch.got} differ from the data's {mismatch.expected}")


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
        (:func:`kdkit.modeling.pooling.use_mean_pooling`); ``None`` keeps what the checkpoint was saved with (``"cls"`` unless kdkit
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
        warnings.warn(f"{who}: trust_remote_code is on: code from '{resolved}' will run", KdkitWarning, stacklevel=2)
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
    if (pooling or getattr(config, POOLING_KEY, "cls")) == "mean":
        use_mean_pooling(model, who=who)
    elif hasattr(model.config, POOLING_KEY):  # asked for [CLS] on a checkpoint saved with mean pooling
        setattr(model.config, POOLING_KEY, "cls")
    return model


#: config keys that hold a model's number of positions (BERT and Llama families; GPT-2).
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def position_limit(config: Any) -> int | None:
    """How many token positions a model has (from its config object or its config.json as a dict), or None."""
    for name in POSITION_KEYS:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(config: Any, max_length: int, who: str) -> None:
    """:raises ModelError: ``max_length`` tokens would not fit the model's position embeddings."""
    limit = position_limit(config)
    if limit is not None and max_length > limit:
        raise ModelError(
            f"{who}: data.max_length = {max_length} is more than the model's {limit} positions; texts that long "
            f"would not fit: use data.max_length <= {limit}"
        )


@contextlib.contextmanager
def written_by_this_process(model: Any) -> Iterator[None]:
    """Within the block, ``model.save_pretrained`` (the Trainer's checkpoints included) writes from this process
    whatever its rank. transformers writes nothing on a process other than rank 0 of an initialised process group,
    which is right for a model all processes train together and wrong for one this process trains alone (teachers
    dealt one per process): its checkpoints and weights would never be written."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        del model.should_save_on_this_rank
