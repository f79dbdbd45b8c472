"""Small instances for optimality-gap studies, stored as safetensors (weight, gram, channels) + provenance.

- Real: sub-problems cut from the dense default model. For a linear layer, d' of its input channels are
  drawn (seeded) and the layer's true calibration Gram (C4 calibration text) is restricted to them; a few
  rows (output channels) are drawn too.
- Synthetic: i.i.d. inputs, correlated inputs (low rank plus noise), heavy outlier channels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .problem import MaskProblem

LAYER_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES = ("iid", "correlated", "outliers")


@dataclass
class Instance:
    name: str
    weight: torch.Tensor      # [rows, d] float64
    gram: torch.Tensor        # [d, d] float64
    meta: dict

    @property
    def d(self) -> int:
        return self.weight.shape[1]

    def problem(self, target: str) -> MaskProblem:
        """The instance at a target: "50%" or "0.5" (share pruned per row) or "N:M"."""
        if ":" in target:
            return MaskProblem(self.weight, self.gram, pattern=target, name=self.name)
        share = float(target.rstrip("%")) / (100 if target.endswith("%") else 1)
        return MaskProblem(self.weight, self.gram, sparsity=share, name=self.name)

    def save(self, folder: Path) -> Path:
        from .checkpoint import write_safetensors_atomic

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.safetensors"
        tensors = {"weight": self.weight.contiguous(), "gram": self.gram.contiguous()}
        write_safetensors_atomic(path, tensors, metadata={"meta": json.dumps(self.meta)})
        return path


def load_instances(folder: Path) -> list[Instance]:
    from safetensors import safe_open

    paths = sorted(Path(folder).glob("*.safetensors"))
    if not paths:
        raise UserError(f"no instances (*.safetensors) in {folder}: create them with `sparseswaps extract`")
    instances = []
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["meta"])
            instances.append(Instance(path.stem, handle.get_tensor("weight"), handle.get_tensor("gram"), meta))
    return instances


def synthetic_instances(widths, rows: int, seed: int, families=FAMILIES, tokens: int = 512) -> list[Instance]:
    instances = []
    for family in families:
        for d in widths:
            generator = torch.Generator().manual_seed(seed * 1000 + d)
            x = _synthetic_inputs(family, tokens, d, generator)
            weight = torch.randn(rows, d, generator=generator, dtype=torch.float64)
            weight *= torch.empty_like(weight).exponential_(generator=generator)   # heavy-tailed weights
            meta = {"kind": "synthetic", "family": family, "d": d, "rows": rows, "tokens": tokens, "seed": seed}
            instances.append(Instance(f"synthetic-{family}-d{d}", weight, x.T @ x, meta))
    return instances


def _synthetic_inputs(family: str, tokens: int, d: int, generator) -> torch.Tensor:
    if family == "iid":
        return torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    if family == "correlated":
        latent = torch.randn(tokens, max(2, d // 4), generator=generator, dtype=torch.float64)
        mixing = torch.randn(latent.shape[1], d, generator=generator, dtype=torch.float64)
        return latent @ mixing / latent.shape[1] ** 0.5 + 0.3 * torch.randn(tokens, d, generator=generator,
                                                                              dtype=torch.float64)
    if family == "outliers":
        x = torch.randn(tokens, d, generator=generator, dtype=torch.float64)
        x[:, torch.randperm(d, generator=generator)[: max(1, d // 16)]] *= 30
        return x
    raise UserError(f"unknown synthetic family {family!r}; choose from {', '.join(FAMILIES)}")


def layer_grams(model, tokenizer, layer_names: list[str], nsamples: int, seqlen: int, seed: int) -> dict:
    """Float64 Gram matrices of the inputs of `layer_names` over C4 calibration windows (dense model)."""
    from .calibration import recording_inputs
    from .data import calibration_windows

    modules = dict(model.named_modules())
    missing = [name for name in layer_names if name not in modules]
    if missing:
        raise UserError(f"the model has no layer {missing[0]!r}")
    windows = calibration_windows(tokenizer, nsamples, seqlen, seed)
    layers = {name: modules[name] for name in layer_names}
    with recording_inputs(layers, "cpu", torch.float64) as accumulators, torch.no_grad():
        for sample in tqdm(windows.input_ids, desc="calibration", unit="window"):
            model(sample.unsqueeze(0), use_cache=False)
    return {name: acc.gram for name, acc in accumulators.items()}, windows.info


def real_instances(model, tokenizer, model_info: dict, blocks: list[int], kinds, widths, rows: int, seed: int,
                   nsamples: int, seqlen: int) -> list[Instance]:
    from .calibration import find_blocks

    prefix, block_list = find_blocks(model)
    names = {}
    for block in blocks:
        if not 0 <= block < len(block_list):
            raise UserError(f"block {block} does not exist: the model has {len(block_list)} blocks")
        for name, module in block_list[block].named_modules():
            if name.rsplit(".", 1)[-1] in kinds and type(module) is torch.nn.Linear:
                names[f"{prefix}.{block}.{name}"] = module
    if not names:
        raise UserError(f"no layers named {', '.join(kinds)} in the chosen blocks")
    grams, calibration = layer_grams(model, tokenizer, list(names), nsamples, seqlen, seed)
    instances = []
    for layer, module in names.items():
        weight = module.weight.detach().to(torch.float64)
        for d in widths:
            if d > weight.shape[1]:
                continue
            generator = torch.Generator().manual_seed(seed * 7919 + d + hash_name(layer))
            channels = torch.randperm(weight.shape[1], generator=generator)[:d].sort().values
            picked = torch.randperm(weight.shape[0], generator=generator)[:rows].sort().values
            meta = {"kind": "real", "model": model_info, "layer": layer, "d": d, "rows": rows,
                    "channels": channels.tolist(), "output_rows": picked.tolist(), "seed": seed,
                    "calibration": calibration}
            short = layer.split(".", 1)[-1].replace(".", "-")
            instances.append(Instance(f"real-{short}-d{d}", weight[picked][:, channels],
                                      grams[layer][channels][:, channels], meta))
    return instances


def hash_name(text: str) -> int:
    """A stable small integer from a string (Python's hash() is salted per process)."""
    return sum((index + 1) * ord(char) for index, char in enumerate(text)) % 100_003
