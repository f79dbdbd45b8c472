"""Fused GPU scan of `refit_swaps` (Triton): every row's best swap on the re-fitted error in one pass over U.

The torch scan (`refit_swaps._Batch.best_swaps`) builds the numerator, denominator, gain and Δ of every
(kept i, pruned j) pair as separate [rows, k, p] tensors: a dozen passes over memory per scan. Here one
program owns one row and BLOCK_I values of i, walks j in tiles of BLOCK_J reading each U_ij once, and keeps
the tile's smallest Δ and its flat index i·d + j; torch then reduces the programs' minima per row. Under an
N:M pattern a swap stays inside one group of M inputs, so when M divides BLOCK_I only the diagonal tile is
read: O(d·BLOCK_I) per row instead of O(d²).

The arithmetic is the torch scan's, operation for operation, and compiles without fused multiply-adds
(enable_fp_fusion=False), so both pick the same (Δ, i, j) to the last bit (tests/test_gpu.py). Ties go to
the smallest i, then the smallest j, as torch's argmin does.
"""
from __future__ import annotations

import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _best_swap_kernel(u, base, ratio, diagonal, r, c, keep, out_delta, out_index, d, tiles, threshold,
                          group, stride_ub, stride_ui, DIAGONAL_TILE: tl.constexpr, BLOCK_I: tl.constexpr,
                          BLOCK_J: tl.constexpr):  # pragma: no cover
        row = tl.program_id(0)
        tile = tl.program_id(1)
        i = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        in_i = i < d
        at_i = row * d + i
        kept_i = (tl.load(keep + at_i, mask=in_i, other=0) != 0) & in_i
        base_i = tl.load(base + at_i, mask=in_i, other=0.0)[:, None]
        ratio_i = tl.load(ratio + at_i, mask=in_i, other=0.0)[:, None]
        diagonal_i = tl.load(diagonal + at_i, mask=in_i, other=1.0)[:, None]
        best = tl.full([BLOCK_I, BLOCK_J], float("inf"), tl.float64)
        best_at = tl.full([BLOCK_I, BLOCK_J], 0, tl.int64)
        if DIAGONAL_TILE:
            start, stop = tile * BLOCK_I, tile * BLOCK_I + BLOCK_I
        else:
            start, stop = 0, d
        for first in range(start, stop, BLOCK_J):
            j = first + tl.arange(0, BLOCK_J)
            in_j = j < d
            at_j = row * d + j
            pruned_j = (tl.load(keep + at_j, mask=in_j, other=1) == 0) & in_j
            allowed = kept_i[:, None] & pruned_j[None, :]
            if group > 0:
                allowed &= (i[:, None] // group) == (j[None, :] // group)
            u_ij = tl.load(u + row.to(tl.int64) * stride_ub + i[:, None] * stride_ui + j[None, :], mask=allowed, other=0.0)
            numerator = tl.load(r + at_j, mask=in_j, other=0.0)[None, :] + u_ij * ratio_i
            denominator = tl.load(c + at_j, mask=in_j, other=1.0)[None, :] + u_ij * u_ij / diagonal_i
            gain = tl.where(denominator > threshold,
                            numerator * numerator / tl.maximum(denominator, 1e-300), 0.0)
            delta = tl.where(allowed, base_i - gain, float("inf"))
            at = i[:, None].to(tl.int64) * d + j[None, :]
            better = delta < best                # j grows along the loop: on a tie the earlier j stays
            best = tl.where(better, delta, best)
            best_at = tl.where(better, at, best_at)
        low = tl.min(best, axis=1)
        low = tl.min(low, axis=0)
        first_at = tl.min(tl.where(best == low, best_at, d * d), axis=1)
        first_at = tl.min(first_at, axis=0)
        tl.store(out_delta + row * tiles + tile, low)
        tl.store(out_index + row * tiles + tile, first_at)


def best_swaps(u, h, v, r, c, keep, group: int | None, threshold: float):
    """(best Δ, i, j) per row, as `refit_swaps._Batch.best_swaps` computes them, on CUDA: u and h [B, d, d],
    v, r and c [B, d] float64, keep [B, d] bool."""
    batch, d = keep.shape
    diagonal = h.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(h.dtype).tiny)
    ratio = v / diagonal
    base = v * ratio
    block_i, block_j = 32, 64
    tiles = triton.cdiv(d, block_i)
    diagonal_tile = group is not None and block_i % group == 0
    out_delta = torch.empty(batch, tiles, dtype=torch.float64, device=u.device)
    out_index = torch.empty(batch, tiles, dtype=torch.int64, device=u.device)
    u = u.contiguous()
    _best_swap_kernel[(batch, tiles)](
        u, base.contiguous(), ratio.contiguous(), diagonal.contiguous(), r.contiguous(), c.contiguous(),
        keep.contiguous().view(torch.uint8), out_delta, out_index, d, tiles, threshold, group or 0,
        u.stride(0), u.stride(1), DIAGONAL_TILE=diagonal_tile, BLOCK_I=block_i,
        BLOCK_J=block_i if diagonal_tile else block_j, num_warps=4, enable_fp_fusion=False)
    best = out_delta.min(1).values
    flat = torch.where(out_delta == best[:, None], out_index, d * d).min(1).values
    return best, flat // d, flat % d
