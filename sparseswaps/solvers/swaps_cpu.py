"""The per-row 1-swap scan compiled for the CPU with numba, the way the GPU kernel works.

Each row is one parallel task. For every pruned i the inner loop updates an elementwise running minimum
over all j, low[j] = min(low[j], a_i - 2 w_i w_j G_ij): no reduction inside the loop, so LLVM turns it into
packed multiply, FMA and min instructions (AVX2 and FMA here). Afterwards the best j minimises
low[j] + b_j over the kept j, and the i of that j is found in one more pass over the pruned entries. The
terms a and b are computed in the kernel, in w's dtype (float32 by default), and a large finite
sentinel stands in for +inf, since fastmath makes arithmetic on infinities undefined.
Exact ties go to the smallest j, then the smallest i, as in every engine (swap_formula).
benchmarks/results/bench_cpu_scan.md has its rate against this machine's measured floor.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from .swap_formula import swap_terms

AVAILABLE = importlib.util.find_spec("numba") is not None
# Stands in for +inf: far above any real term, and twice it is still finite in float32.
SENTINEL = 1e30

if AVAILABLE:
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True)
    def _scan(gram, w, c, mask, low, best, best_i, best_j):   # pragma: no cover - compiled
        rows, d = w.shape
        sentinel = w.dtype.type(SENTINEL)
        for r in prange(rows):
            wr, cr, lr, kept = w[r], c[r], low[r], mask[r]
            for j in range(d):
                lr[j] = sentinel
            for i in range(d):
                if kept[i]:
                    continue
                twice = wr[i] + wr[i]       # (-2 w_i, kept in w's dtype: a float literal would promote it)
                a, s, gi = wr[i] * wr[i] * gram[i, i] - twice * cr[i], -twice, gram[i]
                for j in range(d):          # elementwise: vectorises
                    value = a + s * (wr[j] * gi[j])
                    lr[j] = value if value < lr[j] else lr[j]
            top_j, top = -1, sentinel
            for j in range(d):              # first kept j reaching the minimum of low + b
                if kept[j]:
                    value = lr[j] + (wr[j] * wr[j] * gram[j, j] + (wr[j] + wr[j]) * cr[j])
                    if value < top:
                        top, top_j = value, j
            top_i, low_i = -1, sentinel
            for i in range(d):              # first pruned i reaching low[top_j]
                if not kept[i]:
                    twice = wr[i] + wr[i]
                    value = (wr[i] * wr[i] * gram[i, i] - twice * cr[i]) - twice * (wr[top_j] * gram[i, top_j])
                    if value < low_i:
                        low_i, top_i = value, i
            best[r], best_i[r], best_j[r] = top, top_i, top_j

    @njit(parallel=True, fastmath=False, cache=True)
    def _candidate_swaps(top, active, w, c, gram, kept, swaps):   # pragma: no cover - compiled
        """swaps.candidate_swaps_torch in float64 (no fastmath: these are the exact checks), one row per task."""
        rows, d = w.shape
        for r in prange(rows):
            if not active[r]:
                continue
            wr, cr, mr = w[r], c[r], kept[r]
            for j in top[r]:
                if not mr[j]:
                    continue
                b = wr[j] * wr[j] * gram[j, j] + 2.0 * wr[j] * cr[j]
                best, best_i = np.inf, -1
                for i in range(d):
                    if not mr[i]:
                        value = wr[i] * wr[i] * gram[i, i] - 2.0 * wr[i] * cr[i] - 2.0 * wr[i] * wr[j] * gram[j, i]
                        if value < best:
                            best, best_i = value, i
                if best_i < 0 or best + b >= 0:
                    continue
                mr[best_i], mr[j] = True, False
                gi, gj = gram[best_i], gram[j]
                for k in range(d):
                    cr[k] += wr[j] * gj[k] - wr[best_i] * gi[k]
                swaps[r] += 1


def scan_per_row_numba(w, mask, c, gram, pattern):
    """Best (Δ, i, j) per row over (pruned i, kept j); CPU tensors in, CPU tensors out (c may be float64:
    the terms are computed in w's dtype, as `swap_formula.swap_terms` does)."""
    return _run(w, mask, c, gram)[:3]


def scan_candidates_numba(w, mask, c, gram, pattern, k: int):
    """`scan_per_row_numba`'s best (Δ, i, j) and each row's k best kept columns j by low[j] + b_j [rows, k]."""
    best, best_i, best_j, low = _run(w, mask, c, gram)
    _, prune = swap_terms(w, c, gram.diagonal())
    ranking = torch.where(mask, low + prune.to(low.dtype), torch.inf)
    return best, best_i, best_j, ranking.topk(min(k, w.shape[1]), 1, largest=False).indices


def candidate_swaps_numba(top, active, w64, c64, gram64, work_mask) -> torch.Tensor:
    """In place on the CPU: for each row's candidate columns in turn, its best pruned i on the current
    state, applied where Δ < 0 in float64 (work_mask and c64 updated); the swaps applied per row."""
    swaps = np.zeros(len(w64), dtype=np.int64)
    _candidate_swaps(top.contiguous().numpy(), active.contiguous().numpy(), w64.contiguous().numpy(),
                     c64.numpy(), gram64.contiguous().numpy(), work_mask.numpy(), swaps)
    return torch.from_numpy(swaps)


def _run(w, mask, c, gram):
    rows, d = w.shape
    w = w.contiguous()
    best = np.empty(rows, dtype=w.numpy().dtype)
    best_i = np.empty(rows, dtype=np.int64)
    best_j = np.empty(rows, dtype=np.int64)
    low = np.empty((rows, d), dtype=best.dtype)
    _scan(gram.to(w.dtype).contiguous().numpy(), w.numpy(), c.to(w.dtype).contiguous().numpy(),
          mask.contiguous().numpy(), low, best, best_i, best_j)
    return torch.from_numpy(best), torch.from_numpy(best_i), torch.from_numpy(best_j), torch.from_numpy(low)
