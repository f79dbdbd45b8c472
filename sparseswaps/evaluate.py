"""Token perplexity as SparseGPT and Wanda compute it: non-overlapping windows, mean next-token loss per
window, perplexity = exp(mean over windows). `streaming_perplexities` is the pipeline's (block by block);
`perplexity` runs a whole in-memory model (the independent check the tests compare it with)."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import Windows, evaluation_windows
from .distributed import SINGLE, Ranks, shard_bounds
from .errors import UserError


def window_losses(model, input_ids: torch.Tensor, device, desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token cross-entropy of every window, float64 [windows]."""
    losses = torch.empty(len(input_ids), dtype=torch.float64)
    with torch.no_grad():
        for index in tqdm(range(len(input_ids)), desc=desc, leave=False, unit="window"):
            window = input_ids[index:index + 1].to(device)
            logits = model(window, use_cache=False).logits[0, :-1].float()
            losses[index] = F.cross_entropy(logits, window[0, 1:]).double().cpu()
    return losses


def perplexity(model, windows: Windows, device) -> dict:
    losses = window_losses(model, windows.input_ids, device, desc=f"ppl {windows.info['corpus']}")
    return {"ppl": math.exp(losses.mean().item()), **windows.info}


def streaming_perplexities(lazy, corpora, seqlen: int, device, *, bos_per_window: bool,
                           max_windows: int | None = None, overrides=None, desc: str = "evaluating",
                           ranks: Ranks = SINGLE) -> dict:
    """Perplexity of each corpus with one block in memory at a time: every corpus's windows go through block i
    before block i + 1 is read, as SparseGPT's evaluation does, so a model larger than the GPU is evaluated
    on it. `overrides(i)` gives block i's replaced tensors (the pruned weights), or None. Under torchrun
    (`ranks`) each rank evaluates a contiguous share of the windows and the per-window losses are gathered:
    a window's loss does not depend on the others, so the perplexity is the single process's."""
    if not corpora:
        return {}
    windows = [evaluation_windows(name, lazy.tokenizer, seqlen, bos_per_window=bos_per_window,
                                  max_windows=max_windows) for name in corpora]
    input_ids = torch.cat([w.input_ids for w in windows])
    if len(input_ids) < ranks.world:
        raise UserError(f"{len(input_ids)} evaluation windows cannot be shared by {ranks.world} ranks: evaluate "
                        "more windows (--eval-windows) or start fewer ranks")
    shares = shard_bounds(len(input_ids), ranks.world)
    own = shares[ranks.rank]
    losses = ranks.gather_rows(streaming_losses(lazy, input_ids[own.start:own.stop], device, overrides, desc),
                               [len(share) for share in shares])
    results, start = {}, 0
    for name, corpus in zip(corpora, windows):
        count = len(corpus.input_ids)
        results[name] = {"ppl": math.exp(losses[start:start + count].mean().item()), **corpus.info}
        start += count
    return results


def streaming_losses(lazy, input_ids: torch.Tensor, device, overrides=None, desc: str = "evaluating") -> torch.Tensor:
    """Mean next-token cross-entropy of every window, float64 [windows], block by block."""
    from .calibration import activation_device, capture_block_inputs, run_block

    device = torch.device(device)
    hidden_size = lazy.model.config.get_text_config().hidden_size
    store = activation_device(device, input_ids.numel() * hidden_size * lazy.dtype.itemsize)
    lazy.load_outer(device)
    inputs = capture_block_inputs(lazy.model, lazy.blocks, input_ids, store)
    lazy.release_outer()
    hidden = inputs.hidden
    for index in tqdm(range(len(lazy.blocks)), desc=desc, unit="block", leave=False):
        lazy.load_block(index, device, overrides(index) if overrides else None)
        if index == len(lazy.blocks) - 1:
            returns_tuple = _returns_tuple(lazy.blocks[index], hidden[0], inputs.kwargs[index], device)
        hidden = run_block(lazy.blocks[index], hidden, inputs.kwargs[index], device)
        lazy.release_block(index)
    lazy.load_outer(device)
    try:
        return _tail_losses(lazy.model, lazy.blocks, hidden, input_ids, device, returns_tuple)
    finally:
        lazy.release_outer()


def _returns_tuple(block, states, kwargs, device) -> bool:
    from .calibration import to_device

    with torch.no_grad():
        return isinstance(block(states.to(device), **to_device(kwargs, device)), (tuple, list))


def _tail_losses(model, blocks, hidden, input_ids, device, returns_tuple: bool) -> torch.Tensor:
    """The model's own forward after its blocks (final norm, head, soft-capping) on the last block's outputs:
    block 0 hands back the stored output of the window, the other blocks pass it through."""
    current: list[torch.Tensor] = []
    originals = [block.forward for block in blocks]

    def replay(index):
        def forward(*args, **kw):
            states = current[0] if index == 0 else (args[0] if args else kw["hidden_states"])
            return (states,) if returns_tuple else states
        return forward

    losses = torch.empty(len(input_ids), dtype=torch.float64)
    try:
        for index, block in enumerate(blocks):
            block.forward = replay(index)
        with torch.no_grad():
            for index in range(len(input_ids)):
                current[:] = [hidden[index].to(device)]
                window = input_ids[index:index + 1].to(device)
                logits = model(window, use_cache=False).logits[0, :-1].float()
                losses[index] = F.cross_entropy(logits, window[0, 1:]).double().cpu()
    finally:
        for block, original in zip(blocks, originals):
            block.forward = original
    return losses
