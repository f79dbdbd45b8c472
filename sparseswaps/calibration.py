"""Generic sequential block walker for any transformers causal LM.

1. Find the decoder blocks (the largest nn.ModuleList of identical modules).
2. Capture the inputs of block 0 for every calibration sample and the keyword arguments the model passes
   to *each* block (masks and rotary tables can differ per block, e.g. Gemma's sliding/global layers): every
   block's forward is temporarily replaced by a recorder, so this pass costs only the embeddings.
3. Per block: accumulate one Gram matrix per distinct linear-layer input with forward hooks (q/k/v read
   the same tensor, so do gate/up: they share one accumulator), hand the layers to a callback that prunes
   them, then recompute the block's outputs with the pruned weights as the next block's inputs. Only the
   current block is on the compute device; the activations stay there too when they fit
   (`activation_device`), since shuttling them over PCIe for every sample twice per block costs more than
   the block's own compute on a small model.
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


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor,
                         store="cpu") -> BlockInputs:
    """Inputs of block 0 for every sample (kept on `store`) and each block's kwargs (recorded on the first
    sample). Only the modules before the first block compute: the blocks' weights are never touched."""
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    hidden: list[torch.Tensor] = []
    kwargs: list[dict | None] = [None] * len(blocks)
    originals = [block.forward for block in blocks]

    def recorder(index):
        def forward(*args, **kw):
            states = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                hidden.append(states.detach().to(store))
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
                    model(sample.unsqueeze(0).to(device), use_cache=False)
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


HALF_INPUTS = (torch.bfloat16, torch.float16)


def accumulate_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += xᵀx. Half-precision inputs on CUDA go through the tensor cores with float32 output: a product
    of two bfloat16 (or float16) numbers is exact in float32 and the sums are float32 as before, so this is
    the float32 Gram up to summation order, at tensor-core speed (benchmarks/results/gram_bf16_h200.md)."""
    if x.is_cuda and x.dtype in HALF_INPUTS and gram.dtype == torch.float32:
        gram.add_(torch.mm(x.T, x, out_dtype=torch.float32))
    else:
        x = x.to(gram.dtype)
        gram.addmm_(x.T, x)


class GramAccumulator:
    """Running G = Σ xᵀx, Σ x and the token count of one linear layer's inputs (forward hook)."""

    def __init__(self, width: int, device, dtype=torch.float32):
        self.gram = torch.zeros(width, width, device=device, dtype=dtype)
        self.total = torch.zeros(width, device=device, dtype=torch.float64)
        self.tokens = 0
        self.samples = 0

    def hook(self, module, inputs, output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        accumulate_gram(self.gram, x)
        self.total += x.sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]
        self.samples += 1

    @classmethod
    def of(cls, gram: torch.Tensor, total: torch.Tensor, tokens: int, samples: int) -> "GramAccumulator":
        statistics = cls.__new__(cls)
        statistics.gram, statistics.total, statistics.tokens, statistics.samples = gram, total, tokens, samples
        return statistics

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def activation_device(device, size_bytes: int, headroom: float = 4.0) -> torch.device:
    """Where activations of `size_bytes` live: on the GPU when `headroom` times their size is free there
    (inputs and outputs coexist, plus the block's own working memory), else on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if headroom * size_bytes < free else torch.device("cpu")


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
    """Forward hooks accumulating each layer's own input statistics while a model runs (instance extraction);
    yields the accumulators."""
    accumulators = {name: GramAccumulator(layer.in_features, device, dtype) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(accumulators[name].hook) for name, layer in layers.items()]
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


class SharedInputs:
    """Forward hooks that give layers reading the very same input tensor (q/k/v, gate/up) one accumulator.

    The first sample decides the groups (the tensor objects the layers receive); every later sample must
    show the same sharing, else the block's forward depends on its data in a way the groups cannot express.
    """

    def __init__(self, layers: dict[str, nn.Linear], device, dtype=torch.float32):
        self.layers, self.device, self.dtype = layers, device, dtype
        self.owner: dict[str, str] = {}             # layer -> the layer whose accumulator it shares
        self.accumulators: dict[str, GramAccumulator] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []   # this sample's inputs (kept alive) and their owner

    def next_sample(self) -> None:
        self._seen.clear()

    def hook(self, name: str):
        def record(module, inputs, output):
            x = inputs[0]
            owner = next((first for tensor, first in self._seen if tensor is x), None)
            if name not in self.owner:
                self.owner[name] = owner or name
            elif self.owner[name] != (owner or name):
                raise UserError(f"layer {name} shared its input with {self.owner[name]} on the first calibration "
                                "sample but not on a later one: its block cannot be pruned with shared Grams")
            if owner is None:
                self._seen.append((x, name))
                if name not in self.accumulators:
                    self.accumulators[name] = GramAccumulator(module.in_features, self.device, self.dtype)
                self.accumulators[name].hook(module, inputs, output)
        return record

    def groups(self) -> dict[str, list[str]]:
        """Owner layer -> every layer reading its input, in the block's layer order."""
        groups: dict[str, list[str]] = {}
        for name in self.layers:
            if name not in self.owner:
                raise UserError(f"layer {name} never ran in its block's forward: nothing to calibrate it with")
            groups.setdefault(self.owner[name], []).append(name)
        return groups


@dataclass
class InputGroup:
    """Layers reading one input: their names and that input's statistics."""
    names: list[str]
    statistics: GramAccumulator


def gram_groups(block: nn.Module, layers: dict[str, nn.Linear], hidden: list[torch.Tensor], kwargs: dict,
                device, dtype=torch.float32) -> list[InputGroup]:
    """Run the (dense) block over every sample, accumulating one Gram per distinct input."""
    shared = SharedInputs(layers, device, dtype)
    handles = [layer.register_forward_hook(shared.hook(name)) for name, layer in layers.items()]
    kwargs = to_device(kwargs, device)
    try:
        with torch.no_grad():
            for states in hidden:
                shared.next_sample()
                block(states.to(device), **kwargs)
    finally:
        shared.next_sample()
        for handle in handles:
            handle.remove()
    return [InputGroup(names, shared.accumulators[owner]) for owner, names in shared.groups().items()]



def merge_chunks(chunks: list[list[InputGroup]], ranks) -> list[InputGroup]:
    """One statistics set per input group from the per-chunk ones of every rank, summed chunk after chunk in
    order (`distributed.Ranks.fold_in_order`), so the sum's rounding does not depend on which process
    computed which chunk. A single process's single chunk is returned as it is."""
    if len(chunks) == 1 and not ranks.distributed:
        return chunks[0]
    merged = []
    for index, group in enumerate(chunks[0]):
        if any(chunk[index].names != group.names for chunk in chunks):
            raise UserError(f"layers {group.names} shared their input differently between calibration windows")
        parts = [chunk[index].statistics for chunk in chunks]
        counts = ranks.fold_in_order([torch.tensor([part.tokens, part.samples]) for part in parts])
        merged.append(InputGroup(group.names, GramAccumulator.of(
            ranks.fold_in_order([part.gram for part in parts]), ranks.fold_in_order([part.total for part in parts]),
            int(counts[0]), int(counts[1]))))
    return merged
