"""Causal LMs end to end (issue 14): kdkit's top-k stores built once against online distillation, where the
teachers run at every student step (the way TRL's GKD trainer works), at 5 teachers, in one run.

The same 5 teachers (randomly initialised Llamas: 4 layers, 128 wide, the 4,096-token SOTU BPE; their weights do
not change the cost), the same 1-layer, 64-wide student, the same 320 SOTU chunks of 64 tokens, the same
:class:`kdkit.TokenDistillationLoss` (UniKD correctness, top-32, T = 1), the same kdkit ``fit`` (Trainer, batch
16, AdamW) for ``--epochs`` epochs:

* ``kdkit``: each teacher's top-k store of the chunks built once (:func:`kdkit.modeling.topk.build_topk_store`),
  then the student trains reading them (:class:`kdkit.training.causal_lm.StoreDistillation`);
* ``online``: the student trains with every teacher run on each batch (no gradient) and its logits cut to the same
  top-k (:meth:`kdkit.TopKTeachers.from_logits`) before the same loss.

Wall time and process CPU time (on a shared machine the CPU time is the work done, the wall time also the wait).

    make data-lm && python -m benchmarks.bench_lm_e2e            # 3 epochs
    python -m benchmarks.bench_lm_e2e --epochs 1 --rows 96       # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kdkit import TokenDistillationLoss, TopKTeachers  # noqa: E402
from kdkit.data.tokens import Encoding, encode_split  # noqa: E402
from kdkit.modeling.topk import build_topk_store  # noqa: E402
from kdkit.recipe.schema import TrainConfig  # noqa: E402
from kdkit.store.topk import TopKSpec  # noqa: E402
from kdkit.training.arguments import training_arguments  # noqa: E402
from kdkit.training.causal_lm import CausalLMCollator, StoreDistillation, TokenDataset  # noqa: E402
from kdkit.training.loop import fit  # noqa: E402
from kdkit.training.objectives import ObjectiveOutput  # noqa: E402

BASE = Path(".data/sotu-bpe")
DATA = Path(".data/sotu/train.jsonl")
K, TEACHERS, LENGTH, BATCH = 32, 5, 64, 16


class OnlineDistillation:
    """What :class:`StoreDistillation` computes, with the teachers run on every batch instead of read from stores
    (the batches here have no generated position)."""

    def __init__(self, teachers: list[torch.nn.Module], loss_fn: TokenDistillationLoss) -> None:
        self.models, self.loss_fn = teachers, loss_fn

    def __call__(self, model: torch.nn.Module, inputs: dict[str, Any]) -> ObjectiveOutput:
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "generated", "kd_index")}
        labels, generated = inputs["labels"], inputs["generated"]
        with torch.no_grad():
            dense = torch.stack([t(**model_inputs).logits for t in self.models], dim=2)  # [B, L, N, V]
        stored = TopKTeachers.from_logits(dense, labels.masked_fill(generated, -100), k=K, temperature=1.0)
        outputs = model(**model_inputs)
        out = self.loss_fn(outputs.logits, stored, labels, generated)
        return ObjectiveOutput(out.loss, outputs, {"kd_weight": out.kd_weights, "sample_weight": out.sample_weights})


def models(vocab: int) -> tuple[list[torch.nn.Module], Any]:
    def make(layers: int, hidden: int, seed: int) -> torch.nn.Module:
        config = AutoConfig.from_pretrained(str(BASE))
        config.update({"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hidden // 2})  # fmt: skip
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()

    return [make(4, 128, 100 + i) for i in range(TEACHERS)], lambda: make(1, 64, 0)


def timed(work: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--rows", type=int, default=320)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    rows = datasets.load_dataset("json", data_files=str(DATA), split="train").select(range(args.rows))
    rows = rows.add_column("row", list(range(len(rows))))
    sequences = encode_split(tokenizer, rows, ["text"], Encoding("text", LENGTH), split="train", prompts=False)
    teachers, student = models(len(tokenizer))
    loss_fn = TokenDistillationLoss.from_plugins({"unikd-correctness": {}}, temperature=1.0)
    collator = CausalLMCollator(int(tokenizer.pad_token_id))
    cfg = TrainConfig(batch_size=BATCH, epochs=args.epochs, learning_rate=3e-3, logging_steps=10_000)
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def build() -> list[Any]:
            specs = [TopKSpec(teacher=f"t{i}", tokenizer="bench", k=K, temperature=1.0, max_length=LENGTH,
                              vocab_size=len(tokenizer)) for i in range(TEACHERS)]  # fmt: skip
            return [[build_topk_store(t, sequences.ids, Path(tmp) / "topk", s, keys=sequences.keys).store]
                    for t, s in zip(teachers, specs, strict=True)]  # fmt: skip

        def train(objective: Any, where: str) -> int:
            training = training_arguments(cfg, output_dir=Path(tmp) / where, seed=0)
            _, done = fit(student(), tokenizer, TokenDataset(sequences, kd_offset=0), training, objective=objective,
                          collator=collator, label=where)  # fmt: skip
            return done.steps

        stores, build_wall, build_cpu = timed(build)
        steps, train_wall, train_cpu = timed(lambda: train(StoreDistillation(stores, sequences.keys, loss_fn), "kdkit"))
        figures["kdkit"] = {"stores_s": build_wall, "train_s": train_wall, "total_s": build_wall + train_wall,
                            "total_cpu_s": build_cpu + train_cpu, "steps": steps}  # fmt: skip
        steps, wall, cpu = timed(lambda: train(OnlineDistillation(teachers, loss_fn), "online"))
        figures["online"] = {"total_s": wall, "total_cpu_s": cpu, "steps": steps}
    ratio = figures["online"]["total_s"] / figures["kdkit"]["total_s"]
    ratio_cpu = figures["online"]["total_cpu_s"] / figures["kdkit"]["total_cpu_s"]
    figures["ratio"] = {"wall": ratio, "cpu": ratio_cpu, "load": os.getloadavg()}  # type: ignore[dict-item]
    print(f"{'':8} {'stores':>8} {'training':>9} {'total':>8} {'total CPU':>10} {'steps':>6}")
    for name, f in (("kdkit", figures["kdkit"]), ("online", figures["online"])):
        print(f"{name:8} {f.get('stores_s', 0):8.1f} {f.get('train_s', f['total_s']):9.1f} {f['total_s']:8.1f} "
              f"{f['total_cpu_s']:10.1f} {int(f['steps']):6d}")  # fmt: skip
    print(f"online / kdkit: {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU (load {os.getloadavg()[0]:.1f})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
