"""Fused GPU scan of `refit_swaps` (Triton): every row's best swap on the re-fitted error in one pass over U.

The torch scan (`refit_swaps._Batch._scan`) builds the numerator, denominator, gain and Δ of every (kept slot
a, pruned slot b) pair as separate [rows, k, p] tensors: a dozen passes over memory per scan. Here one
program owns one row and BLOCK_I kept slots, walks the pruned slots in tiles of BLOCK_J reading each U_ab
once, and keeps the tile's smallest Δ and its key i·d + j (the inputs the slots hold); torch then reduces the
programs' minima per row. Under an N:M pattern each group's inputs hold consecutive kept and pruned slots,
so a program reads only the pruned slots of the groups its kept slots belong to: O(k·BLOCK_I) per row
instead of O(k·p).

The arithmetic is the torch scan's, operation for operation, and compiles without fused multiply-adds
(enable_fp_fusion=False), so both pick the same (Δ, key) to the last bit (tests/test_gpu.py). Ties go to the
smallest key: the smallest dropped input, then the smallest added one.
"""
from __future__ import annotations

import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _best_swap_kernel(u, base, ratio, diagonal, r, c, kept, pruned, out_delta, out_key, k, p, d, tiles,
                          threshold, kept_per_group, pruned_per_group, stride_ub, stride_ua, GROUPED: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):  # pragma: no cover
        row = tl.program_id(0)
        tile = tl.program_id(1)
        a = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        in_a = a < k
        at_a = row * k + a
        i = tl.load(kept + at_a, mask=in_a, other=0)
        base_a = tl.load(base + at_a, mask=in_a, other=0.0)[:, None]
        ratio_a = tl.load(ratio + at_a, mask=in_a, other=0.0)[:, None]
        diagonal_a = tl.load(diagonal + at_a, mask=in_a, other=1.0)[:, None]
        best = tl.full([BLOCK_I, BLOCK_J], float("inf"), tl.float64)
        best_j = tl.full([BLOCK_I, BLOCK_J], d, tl.int32)     # an element's kept input is fixed: ties go by j
        if GROUPED:
            first_a = tile * BLOCK_I
            last_a = tl.minimum(first_a + BLOCK_I, k) - 1
            start = (first_a // kept_per_group) * pruned_per_group
            stop = (last_a // kept_per_group + 1) * pruned_per_group
        else:
            start, stop = 0, p
        for first in range(start, stop, BLOCK_J):
            b = first + tl.arange(0, BLOCK_J)
            in_b = b < stop
            at_b = row * p + b
            j = tl.load(pruned + at_b, mask=in_b, other=0).to(tl.int32)
            allowed = in_a[:, None] & in_b[None, :]
            if GROUPED:
                allowed &= (a[:, None] // kept_per_group) == (b[None, :] // pruned_per_group)
            u_ab = tl.load(u + row.to(tl.int64) * stride_ub + a[:, None] * stride_ua + b[None, :], mask=allowed,
                           other=0.0)
            numerator = tl.load(r + at_b, mask=in_b, other=0.0)[None, :] + u_ab * ratio_a
            denominator = tl.load(c + at_b, mask=in_b, other=1.0)[None, :] + u_ab * u_ab / diagonal_a
            gain = tl.where(denominator > threshold,
                            numerator * numerator / tl.maximum(denominator, 1e-300), 0.0)
            delta = tl.where(allowed, base_a - gain, float("inf"))
            better = allowed & ((delta < best) | ((delta == best) & (j[None, :] < best_j)))
            best = tl.where(better, delta, best)
            best_j = tl.where(better, j[None, :], best_j)
        low = tl.min(best, axis=1)
        low = tl.min(low, axis=0)
        best_key = tl.where(best_j < d, i[:, None].to(tl.int64) * d + best_j, d * d)
        first_key = tl.min(tl.where(best == low, best_key, d * d), axis=1)
        first_key = tl.min(first_key, axis=0)
        tl.store(out_delta + row * tiles + tile, low)
        tl.store(out_key + row * tiles + tile, first_key)


def best_swaps(u, ratio, diagonal, base, r, c, kept, pruned, d: int, groups: int, threshold: float, *,
               block_i: int | None = None, block_j: int | None = None, num_warps: int | None = None):
    """(best Δ, key i·d + j) per row, as `refit_swaps._Batch._scan` computes them, on CUDA: u [B, k, p],
    ratio, diagonal and base [B, k] and r and c [B, p] float64, kept [B, k] and pruned [B, p] the inputs the
    slots hold, `groups` N:M groups per row (1: unstructured). The tile (block_i kept x block_j pruned
    slots, num_warps) changes the speed only: every tiling gives the same (Δ, key). The unstructured
    default is the fastest of benchmarks/experiments/tune_refit_scan.py at 8B widths on an H200
    (results/tune_refit_scan_h200.txt); N:M keeps the tile it had, not tuned."""
    batch, k = kept.shape
    p = pruned.shape[1]
    grouped = groups > 1
    block_i = block_i or (32 if grouped else 16)
    block_j = block_j or (32 if grouped else 64)
    num_warps = num_warps or (4 if grouped else 8)
    tiles = triton.cdiv(k, block_i)
    out_delta = torch.empty(batch, tiles, dtype=torch.float64, device=u.device)
    out_key = torch.empty(batch, tiles, dtype=torch.int64, device=u.device)
    u = u.contiguous()
    _best_swap_kernel[(batch, tiles)](
        u, base.contiguous(), ratio.contiguous(), diagonal.contiguous(), r.contiguous(), c.contiguous(),
        kept.contiguous(), pruned.contiguous(), out_delta, out_key, k, p, d, tiles, threshold, k // groups,
        p // groups, u.stride(0), u.stride(1), GROUPED=grouped, BLOCK_I=block_i, BLOCK_J=block_j,
        num_warps=num_warps, enable_fp_fusion=False)
    best = out_delta.min(1).values
    return best, torch.where(out_delta == best[:, None], out_key, d * d).min(1).values
