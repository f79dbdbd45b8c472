"""Token perplexity as SparseGPT and Wanda compute it: non-overlapping windows, mean next-token loss per
window, perplexity = exp(mean over windows)."""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .data import Windows, evaluation_windows


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


def evaluate_perplexities(model, tokenizer, corpora, seqlen: int, device, *, bos_per_window: bool,
                          max_windows: int | None = None) -> dict:
    results = {}
    for name in corpora:
        windows = evaluation_windows(name, tokenizer, seqlen, bos_per_window=bos_per_window,
                                     max_windows=max_windows)
        results[name] = perplexity(model, windows, device)
    return results
