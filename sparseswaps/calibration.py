"""Generic sequential block walker for any transformers causal LM.

1. Find the decoder blocks (the largest nn.ModuleList of identical modules).
2. Capture the inputs of block 0 for every calibration sample and the keyword arguments the model passes
   to *each* block (masks and rotary tables can differ per block, e.g. Gemma's sliding/global layers): every
   block's forward is temporarily replaced by a recorder, so this pass costs only the embeddings.
3. Per block: accumulate each targeted linear's Gram matrix with forward hooks, hand the layers to a
   callback that prunes them, then recompute the block's outputs with the pruned weights as the next
   block's inputs. Only the current block is on the compute device; the activations stay there too when
   they fit (`stage_activations`), since shuttling them over PCIe for every sample twice per block
   costs more than the block's own compute on a small model.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the nn.ModuleList of same-class modules holding the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                if size > best_size:
                    best, best_size = (name, module), size
    if best is None:
        raise UserError(f"{type(model).__name__} has no list of decoder blocks (nn.ModuleList) to prune")
    return best


def target_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Every plain float nn.Linear inside a block (packed or quantised modules are skipped)."""
    return {f"{prefix}.{name}": module for name, module in block.named_modules()
            if type(module) is nn.Linear and module.weight.is_floating_point()}


class _Recorded(Exception):
    """Raised by the recorder after the last block has been seen: nothing more needs to run."""


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]                 # per calibration sample, [1, seqlen, hidden], on the CPU
    kwargs: list[dict] = field(default_factory=list)   # per block: the keyword arguments the model passes


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor) -> BlockInputs:
    """Inputs of block 0 for every sample and each block's kwargs (recorded on the first sample)."""
    hidden: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(blocks)
    originals = [block.forward for block in blocks]

    def recorder(index):
        def forward(*args, **kw):
            states = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                hidden.append(states.detach().cpu())
            if kwargs[index] is None:
                kwargs[index] = {k: v for k, v in kw.items() if k != "hidden_states"} | _extra_args(args)
            if index == len(blocks) - 1:
                raise _Recorded
            return states
        return forward

    try:
        for index, block in enumerate(blocks):
            block.forward = recorder(index)
        with torch.no_grad():
            for sample in samples:
                try:
                    model(sample.unsqueeze(0), use_cache=False)
                except _Recorded:
                    pass
    finally:
        for block, original in zip(blocks, originals):
            block.forward = original
    if len(hidden) != len(samples) or any(k is None for k in kwargs):
        raise UserError("could not capture the inputs of every decoder block: the model's forward does not "
                        "call its blocks in order")
    return BlockInputs(hidden, kwargs)


def _extra_args(args: tuple) -> dict:
    if len(args) > 1:
        raise UserError("decoder blocks called with extra positional arguments are not supported")
    return {}


def to_device(value, device):
    """Move tensors inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class GramAccumulator:
    """Running G = Σ xᵀx, Σ x and the token count of one linear layer's inputs (forward hook)."""

    def __init__(self, width: int, device, dtype=torch.float32):
        self.gram = torch.zeros(width, width, device=device, dtype=dtype)
        self.total = torch.zeros(width, device=device, dtype=torch.float64)
        self.tokens = 0
        self.samples = 0

    def hook(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.total += x.sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]
        self.samples += 1

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def stage_activations(hidden: list[torch.Tensor], device, headroom: float = 4.0) -> list[torch.Tensor]:
    """Move the calibration activations to `device` when `headroom` times their size is free there, else
    keep them on the CPU (inputs and outputs coexist, plus the block's own working memory)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [states.cpu() for states in hidden]
    size = sum(states.numel() * states.element_size() for states in hidden)
    free, _ = torch.cuda.mem_get_info(device)
    return [states.to(device) for states in hidden] if headroom * size < free else [states.cpu() for states in hidden]


def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: dict, device) -> list[torch.Tensor]:
    """The block's outputs for every sample, each left on the device its input came from."""
    kwargs = to_device(kwargs, device)
    outputs = []
    with torch.no_grad():
        for states in hidden:
            outputs.append(_block_output(block(states.to(device), **kwargs)).detach().to(states.device))
    return outputs


@contextmanager
def recording_inputs(layers: dict[str, nn.Linear], device, dtype=torch.float32):
    """Forward hooks accumulating each layer's input statistics while the block runs; yields the accumulators."""
    accumulators = {name: GramAccumulator(layer.in_features, device, dtype) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(accumulators[name].hook) for name, layer in layers.items()]
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


def gram_matrices(block: nn.Module, layers: dict[str, nn.Linear], hidden: list[torch.Tensor], kwargs: dict,
                  device, dtype=torch.float32) -> dict[str, GramAccumulator]:
    """Run the (dense) block over every sample, accumulating each layer's input statistics."""
    with recording_inputs(layers, device, dtype) as accumulators:
        run_block(block, hidden, kwargs, device)
    return accumulators

