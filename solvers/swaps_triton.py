"""Fused GPU scan for the per-row 1-swap search (Triton).

For a batch of rows, every (pruned i, kept j) pair is scored without materialising the rows x d x d
tensor. A program owns BLOCK_R rows x BLOCK_J columns j and walks i over the whole width, keeping an
elementwise running minimum
    low[r, j] = min_i (a_ri - 2 w_ri w_rj G_ij)        (a_ri = +inf for kept i)
so the inner loop is three fp32 instructions per pair (FMUL, FFMA, FMNMX) and no reduction; each row of
G (BLOCK_J values) is loaded once per i and used for all BLOCK_R rows. Afterwards, in torch,
best_r = min_j (low[r, j] + b_rj) over kept j gives j, and i is recovered from column j (G is symmetric).
The kernel covers the full d x d square so rows can share G; the share of useful pairs is p*k/d².
Exact ties go to the smallest j, then the smallest i. The driver re-checks every chosen swap in float64.

Two implementations of the same arithmetic: `_low_kernel_gluon` (Gluon, Triton's explicit-layout dialect)
loads each i's row terms straight into the accumulator's row layout, so its loop has no layout
conversions (no shared memory, no barriers); on the H100 it runs 4096 x 4096 in 11.0 ms against 16.6 ms
for the plain Triton `_low_kernel` (benchmarks/results/scan_sass_h100.md). The Triton kernel stays as the
fallback for Triton builds without Gluon, an experimental API.

A first version tiled [rows, i, j] and reduced over j inside every tile: 1.0 T pairs/s on an H100, 10%
of the fp32 floor (benchmarks/results/bench_swaps_v1_3dtile.json).
"""
from __future__ import annotations

import importlib.util

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
GLUON = AVAILABLE and importlib.util.find_spec("triton.experimental.gluon") is not None
KERNELS = ("auto", "gluon", "triton")

if AVAILABLE:
    import triton
    import triton.language as tl

    # UNROLL > 1 unrolls the i loop so the small per-i loads of several steps issue together and their
    # latency overlaps the previous steps' arithmetic.
    CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_J": j, "UNROLL": unroll}, num_warps=warps, num_stages=1)
               for r, j, warps in [(64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 128, 8), (32, 128, 4),
                                   (128, 64, 4), (64, 128, 4)]
               for unroll in (1, 4)]

    @triton.autotune(configs=CONFIGS, key=["d", "rows_bucket"])
    @triton.jit
    def _low_kernel(gram, weight, scale_t, restore_t, low, rows, d, rows_bucket,
                    BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, UNROLL: tl.constexpr):  # pragma: no cover
        pid_r = tl.program_id(0)   # fastest: programs sharing a stripe of G run together (L2 reuse)
        pid_j = tl.program_id(1)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        r_ok = r < rows
        j_ok = j < d
        rj_ok = r_ok[:, None] & j_ok[None, :]
        w = tl.load(weight + r[:, None] * d + j[None, :], mask=rj_ok, other=0.0)
        acc = tl.full([BLOCK_R, BLOCK_J], float("inf"), tl.float32)
        for start in range(0, d, UNROLL):
            for step in tl.static_range(UNROLL):
                i = start + step
                i_ok = i < d
                g = tl.load(gram + i * d + j, mask=j_ok & i_ok, other=0.0)                       # G_ij
                s = tl.load(scale_t + i * rows + r, mask=r_ok & i_ok, other=0.0)                  # -2 w_ri
                a = tl.load(restore_t + i * rows + r, mask=r_ok & i_ok, other=float("inf"))       # a_ri
                acc = tl.minimum(acc, (w * g[None, :]) * s[:, None] + a[:, None])
        tl.store(low + r[:, None] * d + j[None, :], acc, mask=rj_ok)

if GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    def _gluon_config(block_r, block_j, per_thread_r, per_thread_j, threads_r, warps, unroll=4, maxnreg=None):
        """A tile and the blocked layout that spreads it over `warps` warps of 32 threads."""
        return triton.Config({"BLOCK_R": block_r, "BLOCK_J": block_j, "UNROLL": unroll, "SPT_R": per_thread_r,
                              "SPT_J": per_thread_j, "TPW_R": threads_r, "WARPS": warps},
                             num_warps=warps, num_stages=1, maxnreg=maxnreg)

    # 128 x 64 with 4 x 8 values per thread won on the H100 at 4096 x 4096; the smaller tiles give
    # narrow layers enough programs to fill the GPU. Larger thread tiles spill (255 registers); more
    # blocks per SM through fewer registers lost (benchmarks/experiments/scan_sass.py's EXPLORED).
    GLUON_CONFIGS = [_gluon_config(128, 64, 4, 8, 8, 4), _gluon_config(128, 64, 8, 8, 4, 4),
                     _gluon_config(64, 128, 4, 8, 4, 4), _gluon_config(64, 64, 4, 8, 4, 4),
                     _gluon_config(32, 64, 2, 8, 4, 4)]

    @triton.autotune(configs=GLUON_CONFIGS, key=["d", "rows_bucket"])
    @gluon.jit
    def _low_kernel_gluon(gram, weight, scale_t, restore_t, low, rows, d, rows_bucket,
                          BLOCK_R: gl.constexpr, BLOCK_J: gl.constexpr, UNROLL: gl.constexpr,
                          SPT_R: gl.constexpr, SPT_J: gl.constexpr, TPW_R: gl.constexpr,
                          WARPS: gl.constexpr):  # pragma: no cover
        layout: gl.constexpr = gl.BlockedLayout([SPT_R, SPT_J], [TPW_R, 32 // TPW_R], [WARPS, 1], [1, 0])
        r = gl.program_id(0) * BLOCK_R + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
        j = gl.program_id(1) * BLOCK_J + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, layout))
        r_ok = r < rows
        j_ok = j < d
        rj_ok = gl.expand_dims(r_ok, 1) & gl.expand_dims(j_ok, 0)
        w = gl.load(weight + gl.expand_dims(r, 1) * d + gl.expand_dims(j, 0), mask=rj_ok, other=0.0)
        acc = gl.full([BLOCK_R, BLOCK_J], float("inf"), gl.float32, layout=layout)
        for start in range(0, d, UNROLL):
            for step in gl.static_range(UNROLL):
                i = start + step
                i_ok = i < d   # the last step of a width that UNROLL does not divide
                g = gl.load(gram + i * d + j, mask=j_ok & i_ok, other=0.0)                       # G_ij
                s = gl.load(scale_t + i * rows + r, mask=r_ok & i_ok, other=0.0)                  # -2 w_ri
                a = gl.load(restore_t + i * rows + r, mask=r_ok & i_ok, other=float("inf"))       # a_ri
                acc = gl.minimum(acc, (w * gl.expand_dims(g, 0)) * gl.expand_dims(s, 1) + gl.expand_dims(a, 1))
        gl.store(low + gl.expand_dims(r, 1) * d + gl.expand_dims(j, 0), acc, mask=rj_ok)


def scan_per_row_triton(w, mask, c, gram, pattern, kernel: str = "auto"):
    """Best (Δ, i, j) per row over (pruned i, kept j) pairs; float32 CUDA tensors.
    `kernel`: "gluon", "triton", or "auto" (Gluon where this Triton has it)."""
    from .swaps import masked_swap_terms

    if w.dtype != torch.float32:
        raise ValueError("the Triton scan computes in float32 (dtype='float32')")
    low_kernel = _choose_kernel(kernel)
    rows, d = w.shape
    restore, prune = masked_swap_terms(w, mask, c, gram)
    scale = -2 * w
    w = w.contiguous()
    gram = gram.contiguous()
    low = torch.empty(rows, d, device=w.device, dtype=torch.float32)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_J"])

    low_kernel[grid](gram, w, scale.T.contiguous(), restore.T.contiguous(), low, rows, d, _bucket(rows))
    best, j = (low + prune).min(1)                    # first minimum: smallest j on ties
    # i of the winning j: the pruned i minimising a_i - 2 w_i w_j G_ji (one column of G per row).
    column = gram[j] * w.gather(1, j.unsqueeze(1))
    i = (restore + scale * column).argmin(1)
    return best, i, j


def _choose_kernel(kernel: str):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "gluon" and not GLUON:
        raise ValueError(f"kernel 'gluon' needs a Triton with triton.experimental.gluon; this one "
                         f"({triton.__version__}) has none: use kernel='triton' or upgrade Triton")
    return _low_kernel_gluon if kernel == "gluon" or (kernel == "auto" and GLUON) else _low_kernel


def tuned_config(kernel: str = "auto") -> str | None:
    """The tile configuration the autotuner chose for the last shape `kernel` scanned (None before any scan)."""
    chosen = getattr(_choose_kernel(kernel), "best_config", None) if AVAILABLE else None
    return None if chosen is None else str(chosen)


def _bucket(rows: int) -> int:
    """Autotuning key: the kernel's best tile depends on the rows only coarsely."""
    return 1 << max(0, rows - 1).bit_length()
