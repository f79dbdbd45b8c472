"""The scan of `refit_swaps` compiled for the CPU with numba: one pass over each row's kept x pruned pairs.

The torch scan (`refit_swaps._Batch._scan`) builds about eight [rows, k, p] temporaries; this reads each
entry of U once and keeps only the running best. Its arithmetic is the torch scan's, in the same order and
without fastmath (no fused multiply-adds), so it returns the same Δ to the bit and the same swap, ties
included (the smallest key i·d + j). Under N:M it visits only the groups' diagonal blocks. Rows are parallel
tasks.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

AVAILABLE = importlib.util.find_spec("numba") is not None

if AVAILABLE:
    from numba import njit, prange

    @njit(parallel=True, fastmath=False, cache=True)
    def _scan(u, ratio, diagonal, base, r, c, kept, pruned, d, groups, threshold, best, key):   # pragma: no cover - compiled
        rows, k, p = u.shape
        per_kept, per_pruned = k // groups, p // groups
        for row in prange(rows):
            top, top_key = np.inf, d * d
            for group in range(groups):
                for a in range(group * per_kept, (group + 1) * per_kept):
                    ratio_a, diagonal_a, base_a, dropped = ratio[row, a], diagonal[row, a], base[row, a], kept[row, a] * d
                    for b in range(group * per_pruned, (group + 1) * per_pruned):
                        x = u[row, a, b]
                        numerator = r[row, b] + x * ratio_a
                        denominator = c[row, b] + x * x / diagonal_a
                        gain = numerator * numerator / max(denominator, 1e-300) if denominator > threshold else 0.0
                        delta = base_a - gain
                        pair = dropped + pruned[row, b]
                        if delta < top or (delta == top and pair < top_key):
                            top, top_key = delta, pair
            best[row], key[row] = top, top_key


def best_swaps(u, ratio, diagonal, base, r, c, kept, pruned, d: int, groups: int,
               threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(best Δ, its key i·d + j) per row, as the torch scan gives them; float64 state on the CPU."""
    best = torch.empty(len(u), dtype=torch.float64)
    key = torch.empty(len(u), dtype=torch.int64)
    _scan(u.numpy(), ratio.numpy(), diagonal.numpy(), base.numpy(), r.numpy(), c.numpy(), kept.numpy(),
          pruned.numpy(), d, groups, threshold, best.numpy(), key.numpy())
    return best, key
