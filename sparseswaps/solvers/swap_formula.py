"""The 1-swap formula, shared by every engine, and `reference_refine`: the paper's method as it reads.

Per row keep c = G (w ⊙ ¬m). Restoring pruned i and pruning kept j changes the row error by
    Δ_ij = a_i + b_j - 2 w_i w_j G_ij,   a_i = w_i² G_ii - 2 w_i c_i,   b_j = w_j² G_jj + 2 w_j c_j.
Every engine (torch, numba, Triton, Gluon) breaks exact ties at the smallest j, then the smallest i.
"""
from __future__ import annotations

import torch


def swap_terms(w: torch.Tensor, c: torch.Tensor, diag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (gain terms for restoring each entry) and b (cost terms for pruning each entry), in w's dtype
    (the driver keeps c in float64)."""
    c = c.to(w.dtype)
    w2g = w * w * diag
    return w2g - 2 * w * c, w2g + 2 * w * c


def masked_swap_terms(w, mask, c, gram) -> tuple[torch.Tensor, torch.Tensor]:
    """(restore, prune): a where the entry is pruned (a candidate i), b where it is kept (a candidate j),
    +inf elsewhere, so no pair with the wrong roles can win a minimum."""
    a, b = swap_terms(w, c, gram.diagonal())
    return torch.where(mask, torch.inf, a), torch.where(mask, b, torch.inf)


def exact_deltas(w64, c64, gram64, i, j) -> torch.Tensor:
    """Δ of the chosen swap of each row, recomputed in float64 from the float64 state."""
    rows = torch.arange(len(i), device=w64.device)
    wi, wj = w64[rows, i], w64[rows, j]
    return (wi * wi * gram64[i, i] - 2 * wi * c64[rows, i] + wj * wj * gram64[j, j] + 2 * wj * c64[rows, j]
            - 2 * wi * wj * gram64[i, j])


def reference_refine(w: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, max_iters: int,
                     group: int | None = None) -> torch.Tensor:
    """One row's mask after best-improvement 1-swaps in float64, O(d²) per swap: the oracle the engines
    are tested against. `group` = m for N:M patterns (a swap stays inside its group of m inputs)."""
    w, gram, keep = w.double(), gram.double(), keep.clone()
    d = len(w)
    same_group = torch.ones(d, d, dtype=torch.bool) if group is None else (
        torch.arange(d)[:, None] // group == torch.arange(d)[None, :] // group)
    for _ in range(max_iters):
        c = gram @ (w * ~keep)
        a = w * w * gram.diagonal() - 2 * w * c
        b = w * w * gram.diagonal() + 2 * w * c
        delta = a[:, None] + b[None, :] - 2 * w[:, None] * w[None, :] * gram       # [i, j]
        allowed = ~keep[:, None] & keep[None, :] & same_group                       # i pruned, j kept
        delta = torch.where(allowed, delta, torch.inf)
        flat = int(delta.T.argmin())           # first minimum of [j, i]: smallest j, then smallest i
        j, i = divmod(flat, d)
        if not delta[i, j] < 0:
            break
        keep[i], keep[j] = True, False
    return keep
