"""The top-k teacher store of causal LMs (issue 13, item 4): values against a float64 reference, keys, the
manifest, integrity (damage, interrupted builds, two processes) and merging parts.

Every expected number comes from an independent float64 computation: a copy of the model in float64 run on one
sequence at a time, ``torch.log_softmax`` over the whole vocabulary, the gold token read off it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers_reliability import PYTHON, REPO, kdkit_env, one_thread, wait_for
from helpers_topk import MAX_LENGTH, VOCAB, random_sequences, spec, tiny_llama
from kdkit.errors import DataError, ModelError, NonFiniteLogitsError
from kdkit.modeling.topk import build_topk_store, topk_positions
from kdkit.store.logits import CacheWarning
from kdkit.store.topk import (
    CorruptStoreError,
    MissingSequenceError,
    PartInfo,
    StoreMismatchError,
    TopKStore,
    TopKStoreError,
    merge_topk_parts,
    part_directory,
    sequence_key,
    store_key,
    write_store,
)

HELPER = Path(__file__).resolve().parent / "helpers_topk.py"
#: half a unit in the last place, relative: the rounding of a float16 / bfloat16 log-probability
ROUNDING = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_llama()


@pytest.fixture(scope="module")
def sequences() -> list[np.ndarray]:
    return random_sequences(30, seed=1)


def reference(model: Any, tokens: np.ndarray, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-probabilities ``[L - 1, V]`` at ``temperature`` and the gold tokens' ``[L - 1]`` at T = 1,
    from the sequence alone (no batch, no chunks)."""
    exact = copy.deepcopy(model).double().eval()
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.no_grad():
        logits = exact(input_ids=ids, use_cache=False).logits[0, :-1]
    gold = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return torch.log_softmax(logits / temperature, dim=-1), gold


def assert_matches_reference(rows: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, torch.Tensor],
                             k: int, dtype: str) -> None:
    """Stored ``(ids, logprobs, gold)`` of one sequence against :func:`reference`."""
    ids, logprobs, gold = rows
    full, expected_gold = expected
    assert ids.shape == logprobs.shape == (full.shape[0], k) and gold.shape == (full.shape[0],)
    at_ids = full.gather(1, ids.long())
    # each stored log-probability is the reference's for the stored token, within the stored dtype's rounding
    torch.testing.assert_close(logprobs.double(), at_ids, rtol=ROUNDING[dtype], atol=1e-5)
    # the stored tokens are a top-k: best first, distinct, and no other token is more likely than the last one
    assert bool((at_ids[:, :-1] >= at_ids[:, 1:] - 1e-9).all())
    assert all(len(set(row.tolist())) == k for row in ids)
    if k < full.shape[1]:
        others = full.scatter(1, ids.long(), float("-inf")).max(dim=1).values
        assert bool((others <= at_ids[:, -1] + 1e-9).all())
    torch.testing.assert_close(gold.double(), expected_gold, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("k", "temperature", "dtype", "max_tokens"),
    [(8, 2.0, "float16", 40), (5, 1.0, "bfloat16", None), (VOCAB, 1.5, "float16", 64)],
)
def test_values_equal_a_float64_reference(tmp_path, model, sequences, k, temperature, dtype, max_tokens) -> None:
    shapes: list[tuple[int, ...]] = []

    def record(module, args, kwargs):
        assert torch.is_inference_mode_enabled()
        assert kwargs.get("attention_mask") is None  # rows of one length: nothing padded, nothing masked
        shapes.append(tuple(kwargs["input_ids"].shape))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    progress: list[int] = []
    try:
        result = build_topk_store(
            model, sequences, tmp_path, spec(model, k=k, temperature=temperature, dtype=dtype),
            batch_size=4, max_tokens=max_tokens, on_batch=progress.append, shard_positions=50,
        )
    finally:
        hook.remove()
    assert result.built and sum(progress) == len(sequences)
    assert sum(rows for rows, _ in shapes) == len(sequences)
    budget = max_tokens or 10**9
    assert all(rows <= 4 and (rows == 1 or rows * length <= budget) for rows, length in shapes)
    store = result.store
    assert len(store.manifest.shards) > 1  # several shard files were written and read back
    for tokens in sequences:
        expected = reference(model, tokens, temperature)
        assert_matches_reference(store.stored_rows(sequence_key(tokens)), expected, k, dtype)


def test_k_equal_to_the_vocabulary_stores_the_whole_distribution(tmp_path, model, sequences) -> None:
    store = build_topk_store(model, sequences[:6], tmp_path, spec(model, k=VOCAB, temperature=1.0)).store
    rows = store.read([sequence_key(s) for s in sequences[:6]])
    # every row holds every token once, and its probabilities sum to 1 up to float16 rounding
    assert bool((rows.ids.sort(dim=1).values == torch.arange(VOCAB)).all())
    total = torch.logsumexp(rows.logprobs.double(), dim=1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=VOCAB * 2.0**-11)
    # at T = 1 with every token stored, the gold log-probability is the stored one of the gold token
    gold_tokens = torch.cat([torch.as_tensor(s[1:], dtype=torch.long) for s in sequences[:6]])
    at_gold = rows.logprobs.gather(1, (rows.ids == gold_tokens[:, None]).int().argmax(dim=1, keepdim=True))[:, 0]
    torch.testing.assert_close(at_gold.double(), rows.gold.double(), rtol=2.0**-11, atol=1e-5)


def test_topk_positions_against_log_softmax_in_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=generator, dtype=torch.float64) * 4
    gold = torch.randint(0, 50, (7,), generator=generator)
    ids, logprobs, gold_logprobs, finite = topk_positions(logits.float(), gold, 6, 0.5)
    full = torch.log_softmax(logits / 0.5, dim=-1)
    values, expected_ids = full.topk(6, dim=-1)
    assert torch.equal(ids.long(), expected_ids) and ids.dtype == torch.int32
    torch.testing.assert_close(logprobs.double(), values, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gold_logprobs.double(), torch.log_softmax(logits, -1)[torch.arange(7), gold])
    assert bool(finite.all())
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = logits.float().clone()
        broken[3, 17] = bad
        assert topk_positions(broken, gold, 6, 0.5)[3].tolist() == [True, True, True, False, True, True, True]


# --------------------------------------------------------------------------- keys
def test_sequence_key_is_the_sha256_of_the_int32_ids() -> None:
    ids = [5, 0, 70000, 3]
    expected = hashlib.sha256(b"".join(i.to_bytes(4, "little", signed=True) for i in ids)).hexdigest()[:32]
    assert sequence_key(ids) == expected
    assert sequence_key(np.array(ids, dtype=np.int64)) == sequence_key(torch.tensor(ids)) == expected
    assert sequence_key([5, 0, 70000]) != expected
    with pytest.raises(TypeError):
        sequence_key([0.5, 1.0])


def test_keys_find_their_rows_however_the_batch_is_shuffled(tmp_path, model, sequences) -> None:
    store = build_topk_store(model, sequences, tmp_path, spec(model)).store
    keys = [sequence_key(s) for s in sequences]
    order = list(range(len(sequences)))
    random.Random(3).shuffle(order)
    batch = order[:7] + [order[0]]  # repeats are allowed
    rows = store.read([keys[i] for i in batch])
    assert rows.offsets.tolist() == np.cumsum([0] + [len(sequences[i]) - 1 for i in batch]).tolist()
    assert rows.ids.dtype == torch.int64 and rows.logprobs.dtype == rows.gold.dtype == torch.float32
    for b, i in enumerate(batch):
        a, z = rows.offsets[b], rows.offsets[b + 1]
        got = (rows.ids[a:z], rows.logprobs[a:z], rows.gold[a:z])
        assert_matches_reference(got, reference(model, sequences[i], 2.0), 8, "float16")
    padded = rows.padded()
    lengths = torch.tensor([len(sequences[i]) - 1 for i in batch])
    assert torch.equal(padded.mask, torch.arange(int(lengths.max()))[None] < lengths[:, None])
    assert torch.equal(padded.ids[padded.mask], rows.ids) and torch.equal(padded.gold[padded.mask], rows.gold)
    assert not bool(padded.logprobs[~padded.mask].any())
    stranger = sequence_key([1, 2, 3])
    with pytest.raises(MissingSequenceError, match=f"no sequence with key {stranger} \\(item 1 of the batch\\)"):
        store.read([keys[0], stranger])


def test_repeated_and_short_sequences(tmp_path, model, sequences) -> None:
    data = [sequences[0], np.array([7], dtype=np.int32), sequences[1], list(sequences[0]), np.array([], dtype=np.int32)]
    store = build_topk_store(model, data, tmp_path, spec(model)).store
    assert len(store) == 4 and store.manifest.positions == len(sequences[0]) + len(sequences[1]) - 2
    rows = store.read([sequence_key([7]), sequence_key([])])
    assert rows.ids.shape == (0, 8) and rows.offsets.tolist() == [0, 0, 0]


def test_bad_input_is_an_error_naming_the_sequence(tmp_path, model, sequences) -> None:
    keys = [sequence_key(s) for s in sequences[:3]]
    with pytest.raises(DataError, match=f"sequence 1: key {keys[2]} is not the key of its tokens"):
        build_topk_store(model, sequences[:3], tmp_path, spec(model), keys=[keys[0], keys[2], keys[1]])
    long = np.arange(MAX_LENGTH + 1) % VOCAB
    too_long = f"sequence 1 \\(key {sequence_key(long)}\\) has 25 tokens, more than max_length 24"
    with pytest.raises(DataError, match=too_long):
        build_topk_store(model, [sequences[0], long], tmp_path, spec(model))
    with pytest.raises(DataError, match="outside the vocabulary"):
        build_topk_store(model, [[1, VOCAB]], tmp_path, spec(model))
    with pytest.raises(ModelError, match="vocab_size is 97"):
        build_topk_store(model, sequences[:2], tmp_path, spec(model, vocab_size=97))
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]  # nothing was left behind


def test_non_finite_logits_name_the_teacher_the_sequence_and_the_position(tmp_path, model, sequences) -> None:
    victim = sequences[4]

    def poison(module, args, kwargs, output):
        for b, row in enumerate(kwargs["input_ids"]):
            if row.tolist() == victim.tolist():
                output.logits[b, 1, 7] = float("nan")
        return output

    hook = model.register_forward_hook(poison, with_kwargs=True)
    try:
        with pytest.raises(NonFiniteLogitsError, match=f"teacher 2: non-finite logits for sequence 4 \\(key "
                           f"{sequence_key(victim)}\\) at position 1;"):
            build_topk_store(model, sequences, tmp_path, spec(model), who="teacher 2")
    finally:
        hook.remove()
    assert not list(tmp_path.glob(".tmp-*")) and not [p for p in tmp_path.iterdir() if p.is_dir()]


# --------------------------------------------------------------------------- the manifest
@pytest.mark.parametrize(
    ("field", "expected"),
    [("k", 16), ("temperature", 1.0), ("tokenizer", "tokenizer-fingerprint-b"), ("dtype", "bfloat16"),
     ("max_length", 32), ("teacher", "another"), ("vocab_size", 97)],
)
def test_a_manifest_mismatch_names_the_field(tmp_path, model, sequences, field, expected) -> None:
    store = build_topk_store(model, sequences[:4], tmp_path, spec(model)).store
    stored = getattr(spec(model), field)
    manifest = json.loads((store.directory / "manifest.json").read_text())
    assert manifest[field] == stored and manifest["sequences"] == 4 and manifest["format"] == 1
    with pytest.raises(StoreMismatchError, match=f"manifest field '{field}' is {stored!r}, expected {expected!r}"):
        TopKStore.open(store.directory, expect={field: expected})
    with pytest.raises(StoreMismatchError, match=f"'{field}'"):
        TopKStore.open(store.directory, expect=spec(model, **{field: expected}))
    TopKStore.open(store.directory, expect={field: stored, "sequences": 4})  # the stored value is accepted


def test_expecting_an_unknown_field_is_an_error(tmp_path, model, sequences) -> None:
    store = build_topk_store(model, sequences[:2], tmp_path, spec(model)).store
    with pytest.raises(TopKStoreError, match="no manifest field 'temprature' to expect \\(did you mean 'temperature'"):
        TopKStore.open(store.directory, expect={"temprature": 2.0})


def test_the_store_key_changes_with_everything_that_changes_the_content(model, sequences) -> None:
    keys = [sequence_key(s) for s in sequences]
    base = spec(model)
    key = store_key(base, keys)
    assert store_key(base, keys[::-1] + keys[:3]) == key  # the set of sequences, not their order or repeats
    changes = [{"teacher": "t2"}, {"tokenizer": "x"}, {"k": 9}, {"temperature": 1.0}, {"dtype": "bfloat16"},
               {"max_length": 30}, {"vocab_size": 100}]
    others = {store_key(spec(model, **change), keys) for change in changes} | {store_key(base, keys[1:])}
    assert len(others) == len(changes) + 1 and key not in others


# --------------------------------------------------------------------------- integrity
def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) - 5]
    elif how == "flip-data":
        raw[-40] ^= 0x08  # inside the tensors
    elif how == "flip-header":
        raw[20] ^= 0x41  # inside the JSON header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncate", "flip-data", "flip-header", "delete"])
def test_a_damaged_shard_is_detected_and_rebuilt(tmp_path, model, sequences, how) -> None:
    first = build_topk_store(model, sequences, tmp_path, spec(model), shard_positions=60).store
    keys = [sequence_key(s) for s in sequences]
    before = first.read(keys)
    shard = first.directory / first.manifest.shards[1].file
    if how == "delete":
        shard.unlink()
    else:
        _damage(shard, how)
    with pytest.raises(CorruptStoreError, match=shard.name):
        TopKStore.open(first.directory)
    if how == "truncate":  # caught by the header and size check even without the checksums
        with pytest.raises(CorruptStoreError, match=f"{shard.name}"):
            TopKStore.open(first.directory, verify=False)
    with pytest.warns(CacheWarning, match=f"top-k store {first.directory.name} \\(teacher\\) is unusable .*rebuilding"):
        again = build_topk_store(model, sequences, tmp_path, spec(model), shard_positions=60)
    assert again.built
    after = TopKStore.open(first.directory).read(keys)
    for name in ("ids", "logprobs", "gold", "offsets"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name


def test_a_store_is_built_once_then_reused(tmp_path, model, sequences) -> None:
    first = build_topk_store(model, sequences, tmp_path, spec(model))
    again = build_topk_store(model, list(reversed(sequences)), tmp_path, spec(model))  # a shuffled data set
    assert first.built and not again.built and again.store.directory == first.store.directory
    name = first.store.directory.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.lock"]


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, model, sequences) -> None:
    calls = []

    def interrupt(count: int) -> None:
        calls.append(count)
        if len(calls) == 3:
            raise KeyboardInterrupt

    model.train()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_topk_store(model, sequences, tmp_path, spec(model), batch_size=2, shard_positions=10,
                             on_batch=interrupt)
        assert model.training  # its mode is restored
    finally:
        model.eval()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def _driver(root: Path, mode: str, sync: Path | None = None) -> subprocess.Popen[str]:
    args = [PYTHON, str(HELPER), str(root), mode] + ([str(sync)] if sync else [])
    return subprocess.Popen(args, cwd=REPO, env=kdkit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_build_leaves_a_temporary_that_the_next_build_removes(tmp_path) -> None:
    process = _driver(tmp_path, "kill")
    out, err = process.communicate(timeout=300)
    assert process.returncode == -9, err[-3000:]
    [stale] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert stale.name.startswith(".tmp-") and list(stale.glob("shard-*.safetensors"))  # a shard was written
    assert not (stale / ".complete").exists()
    # the same build again, in this process (the driver's model and sequences)
    model = tiny_llama()
    result = build_topk_store(model, random_sequences(40, seed=1), tmp_path, spec(model))
    assert result.built and [p for p in tmp_path.iterdir() if p.is_dir()] == [result.store.directory]
    assert stale.name.startswith(f".tmp-{result.store.directory.name}-")


def test_two_processes_build_one_store_once(tmp_path) -> None:
    root, sync = tmp_path / "stores", tmp_path / "sync"
    sync.mkdir()
    first = _driver(root, "hold", sync)
    wait_for(sync / "holding", first)  # the first holds the store's lock, after its first batch
    second = _driver(root, "probe", sync)
    outputs = []
    for process in (first, second):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        outputs.append(json.loads(out))
    assert (sync / "waiting").exists()  # the second really found the lock taken
    assert [o["built"] for o in outputs] == [True, False]
    assert outputs[0]["directory"] == outputs[1]["directory"]
    assert [p.name for p in root.iterdir() if p.is_dir()] == [Path(outputs[0]["directory"]).name]


# --------------------------------------------------------------------------- parts and merging
def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_merged_parts_are_byte_identical_to_a_one_process_build(tmp_path, model, sequences) -> None:
    data = sequences + [sequences[2]]  # a repeat, as a real data set may hold
    options = dict(batch_size=3, max_tokens=48, shard_positions=70)
    single = build_topk_store(model, data, tmp_path / "one", spec(model), **options).store
    shuffled = list(reversed(data))  # the ranks see the data in another order: the store does not depend on it
    parts = [build_topk_store(model, shuffled, tmp_path / "many", spec(model), part=PartInfo(rank=r, world_size=3),
                              **options).store for r in (2, 0, 1)]
    assert [p.manifest.part.rank for p in parts] == [2, 0, 1]
    assert sum(len(p) for p in parts) == len(single) and all(len(p) for p in parts)
    keys = [sequence_key(s) for s in data]
    merged = merge_topk_parts(tmp_path / "many", spec(model), keys, 3, shard_positions=70)
    assert merged.directory.name == single.directory.name and len(single.manifest.shards) > 1
    assert _tree(merged.directory) == _tree(single.directory)
    assert not (tmp_path / "many" / f"{merged.directory.name}.parts").exists()


def test_merging_needs_every_part(tmp_path, model, sequences) -> None:
    keys = [sequence_key(s) for s in sequences]
    build_topk_store(model, sequences, tmp_path, spec(model), part=PartInfo(rank=0, world_size=2))
    with pytest.raises(TopKStoreError, match="part 1 of 2 is missing"):
        merge_topk_parts(tmp_path, spec(model), keys, 2)
    # a part 1 that holds no sequence, under the right name and manifest (a rank that lost its share)
    key = store_key(spec(model), keys)
    with write_store(part_directory(tmp_path, key, 1, 2), spec(model), store=key, part=PartInfo(rank=1, world_size=2)):
        pass
    with pytest.raises(TopKStoreError, match="do not hold its sequences exactly once: [0-9a-f]{32}"):
        merge_topk_parts(tmp_path, spec(model), keys, 2)
    assert not (tmp_path / key).exists()


def test_the_writer_keeps_the_canonical_order(tmp_path, model) -> None:
    a, b = sorted([sequence_key([1, 2, 3]), sequence_key([4, 5, 6])])
    ids, lp, gold = torch.zeros(2, 8, dtype=torch.int32), torch.zeros(2, 8), torch.zeros(2)
    with pytest.raises(ValueError, match="out of canonical order"):
        with write_store(tmp_path / "s", spec(model), store="s") as writer:
            writer.add(b, ids, lp, gold)
            writer.add(a, ids, lp, gold)  # same length, smaller key: it belongs first
    assert not list(tmp_path.iterdir())
