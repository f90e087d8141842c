"""``kdkit run`` for causal LMs end to end on tiny random Llamas (tests/helpers_lm_pipeline.py): text,
prompt / completion and chat data; the evaluation against a float64 reference computed here from the saved models;
a second run that trains and generates nothing; a run interrupted while it builds a top-k store and again while
a student trains, which ends with the results of an uninterrupted run.

Every run is in this process (no subprocess start-up), offline (tests/conftest.py sets HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE before anything is imported), and interrupted by KeyboardInterrupt at a named point.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import kdkit.tasks.lm_outputs
import kdkit.training.loop
from helpers_lm_pipeline import lm_recipe, make_lm_base
from helpers_reliability import one_thread
from kdkit.experiments.variants import sweep
from kdkit.recipe import validate_recipe
from kdkit.stages.run import run_recipe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lm_base(tmp_path_factory.mktemp("lm") / "base")


def run(raw: dict[str, Any]) -> dict[str, Any]:
    return run_recipe(validate_recipe(raw), console=Console(file=io.StringIO()), print_table=False)


# ----------------------------------------------------------------------------------------- the reference
def gold_log_probs(model_dir: str | Path, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target position of ``sequences`` (every token after the first): the model's float64 log-probability of
    the gold token and whether it is the model's first choice, computed one sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).double().eval()
    gold, first = [], []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            lp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(ids[1:])
            gold.append(lp.gather(1, target[:, None])[:, 0])
            first.append((lp.argmax(dim=-1) == target).double())
    return torch.cat(gold), torch.cat(first)


def eval_sequences(base: Path, raw: dict[str, Any]) -> list[list[int]]:
    """The eval split of a text recipe as token ids: each document, then the end token, cut to ``max_length``
    (``overflow = "truncate"``, kdkit/data/tokens.py's docstring)."""
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    rows = [json.loads(line) for line in Path(raw["data"]["files"]["validation"]).read_text().splitlines()]
    sequences = [tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    return [s[: raw["data"]["max_length"]] for s in sequences]


def figures(gold: torch.Tensor, first: torch.Tensor) -> dict[str, float]:
    return {"perplexity": math.exp(-float(gold.mean())), "accuracy": float(first.mean())}


# ----------------------------------------------------------------------------------------- text
def test_text_run_equals_a_float64_reference_and_a_second_run_trains_nothing(tmp_path, base, monkeypatch) -> None:
    raw = lm_recipe(tmp_path, base, "text", seeds=[1, 2])
    results = run(raw)
    sequences = eval_sequences(base, raw)

    teachers = [gold_log_probs(t["path"], sequences) for t in results["teachers"]]
    for row, (gold, first) in zip(results["teachers"], teachers, strict=True):
        want = figures(gold, first)
        assert row["metrics"]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
        assert row["metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    # the ensemble: the mixture of the teachers' probabilities of the gold token, exactly
    mixture = torch.logsumexp(torch.stack([g for g, _ in teachers]), dim=0) - math.log(len(teachers))
    ensemble = math.exp(-float(mixture.mean()))
    assert results["ensemble"]["perplexity"] == pytest.approx(ensemble, rel=1e-4)
    # Jensen: a mixture's log-likelihood is at least the mean of its members'
    assert results["ensemble"]["perplexity"] <= results["teacher_mean"]["perplexity"]

    for kind in ("student", "labels_only"):
        for row in results[kind]["runs"]:
            want = figures(*gold_log_probs(Path(row["directory"]) / "model", sequences))
            assert row["metrics"]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4), kind
            assert row["metrics"]["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), kind
    steps = [r["steps"] for r in results["student"]["runs"] + results["labels_only"]["runs"]]
    assert steps == [4, 4, 4, 4]  # equal optimizer steps, each seed
    names = [t["name"] for t in results["teachers"]]
    assert set(results["samples"]) >= set(names) and all(len(results["samples"][n]) == 3 for n in names)

    # a sweep: the point as written is this run; lambda = 0 trains one more distilled student, nothing else
    recipe = validate_recipe(raw)
    exp = sweep(recipe, [("plugins.unikd-disagreement.lambda", [0.0, 1.0])], console=Console(file=io.StringIO()),
                plot=False)  # fmt: skip
    assert exp.metric == "perplexity" and [r["point"] for r in exp.records] == [
        {"plugins.unikd-disagreement.lambda": 0.0}, {"plugins.unikd-disagreement.lambda": 1.0}
    ]
    as_written = exp.records[1]
    assert as_written["mean"] == pytest.approx(results["student"]["mean"]["perplexity"], rel=1e-12)
    assert exp.rows[1][-1] == f"{as_written['mean']:.2f} ± {as_written['std']:.2f}"  # as it is, not in percent

    # a second run: teachers, continuations, stores and students all reused
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a second run trained or generated")

    monkeypatch.setattr(kdkit.training.loop, "make_trainer", refuse)
    monkeypatch.setattr(kdkit.tasks.lm_outputs, "generate_continuations", refuse)
    monkeypatch.setattr(kdkit.tasks.lm_outputs, "build_topk_store", refuse)
    again = run(raw)
    assert again["cache"]["teachers_trained"] == 0 and again["cache"]["logits_built"] == []
    assert all(r["reused"] for r in again["student"]["runs"] + again["labels_only"]["runs"])
    assert [t["metrics"] for t in again["teachers"]] == [t["metrics"] for t in results["teachers"]]
    for part in ("ensemble", "samples"):
        assert again[part] == results[part], part
    assert again["student"]["mean"] == results["student"]["mean"]


# ----------------------------------------------------------------------------------------- other formats
@pytest.mark.parametrize("fmt", ["prompt-completion", "chat"])
def test_prompt_completion_and_chat_runs_distill_on_generated_continuations(tmp_path, base, fmt) -> None:
    results = run(lm_recipe(tmp_path, base, fmt))
    assert results["task"] == "causal-lm"
    assert results["data"]["unlabeled"] == results["data"]["labeled"] == 24
    built = results["cache"]["logits_built"]
    assert sum("(generated)" in b for b in built) == 2  # each teacher continued its share of the prompts
    for row in results["teachers"] + results["student"]["runs"] + results["labels_only"]["runs"]:
        assert 1 < row["metrics"]["perplexity"] < 1e4 and 0 <= row["metrics"]["accuracy"] <= 1
    assert results["ensemble"]["perplexity"] <= results["teacher_mean"]["perplexity"]
    assert results["student"]["runs"][0]["steps"] == results["labels_only"]["runs"][0]["steps"] == 4


# ----------------------------------------------------------------------------------------- interrupted runs
def _interrupt_store_build(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """The ``number``-th top-k store build stops (KeyboardInterrupt) after its first batch."""
    real = kdkit.tasks.lm_outputs.build_topk_store
    calls = {"n": 0}

    def build(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == number:
            def stop(count: int) -> None:
                raise KeyboardInterrupt

            kwargs["on_batch"] = stop
        return real(*args, **kwargs)

    monkeypatch.setattr(kdkit.tasks.lm_outputs, "build_topk_store", build)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _interrupt_student(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The first student trainer stops (KeyboardInterrupt) at the end of optimizer step ``step``."""
    real = kdkit.training.loop.make_trainer

    def make(*args: Any, **kwargs: Any) -> Any:
        trainer = real(*args, **kwargs)
        if "/students/" in Path(trainer.args.output_dir).as_posix():
            trainer.add_callback(_StopAt(step))
        return trainer

    monkeypatch.setattr(kdkit.training.loop, "make_trainer", make)


def test_interrupted_store_build_and_student_training_resume_to_the_uninterrupted_results(
    tmp_path, base, monkeypatch
) -> None:
    reference = run(lm_recipe(tmp_path / "reference", base, "text"))
    raw = lm_recipe(tmp_path / "work", base, "text")
    topk = tmp_path / "work" / "cache" / "topk"

    with monkeypatch.context() as patch:
        _interrupt_store_build(patch, number=4)  # teacher 2's first store, after one batch
        with pytest.raises(KeyboardInterrupt):
            run(raw)
    complete = [p for p in topk.iterdir() if (p / ".complete").exists()]
    assert len(complete) == 3 and not (tmp_path / "work" / "runs" / "lm-text" / "results.json").exists()

    with monkeypatch.context() as patch:
        _interrupt_student(patch, step=3)  # after checkpoint-2 (save_steps = 2)
        with pytest.raises(KeyboardInterrupt):
            run(raw)
    [student] = (tmp_path / "work" / "runs" / "lm-text" / "students").iterdir()
    assert (student / "checkpoint-2").is_dir() and not (student / "done.json").exists()

    results = run(raw)
    assert results["cache"]["teachers_trained"] == 0 and results["cache"]["logits_built"] == []
    for part in ("data", "ensemble", "samples", "teacher_mean"):
        assert results[part] == reference[part], part
    for kind in ("student", "labels_only"):
        [ours], [theirs] = results[kind]["runs"], reference[kind]["runs"]
        assert ours["steps"] == theirs["steps"] == 4
        assert ours["metrics"] == pytest.approx(theirs["metrics"], rel=1e-6), kind
    # the stores are the uninterrupted run's, file for file
    for store in (tmp_path / "reference" / "cache" / "topk").iterdir():
        if store.is_dir():
            for path in store.iterdir():
                assert (topk / store.name / path.name).read_bytes() == path.read_bytes(), path
