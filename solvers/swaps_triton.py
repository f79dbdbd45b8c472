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

Two implementations of the same arithmetic. `_low_kernel_gluon` (Gluon, Triton's explicit-layout
dialect) copies chunks of i (G's rows and the rows' terms) into shared memory with asynchronous copies
(cp.async), several chunks ahead, and reads each i's values there straight in the accumulator's layout:
no layout conversions, two barriers per chunk. On the H100 it runs 4096 x 4096 in 8.6 ms against 16.6 ms
for the plain Triton `_low_kernel` and 11.0 ms for a Gluon kernel loading from global memory into
registers (benchmarks/results/scan_sass_h100.md). The Triton kernel stays as the fallback for Triton
builds without Gluon, an experimental API.

The Gluon kernel also runs in float16 (`half_low`: packed HMUL2/HFMA2/HMNMX2, 1.5 instructions per pair)
on operands scaled per row; solvers/swaps.py uses it only as a filter whose candidates it re-scores in
float32 (dtype="float16"). On the H100 it scans 4096 x 4096 in 4.6 ms, but HFMA2 issues at half the FFMA
rate there, so the float16 FMA rate is about the float32 one (benchmarks/results/bench_swaps_half.md).

A first version tiled [rows, i, j] and reduced over j inside every tile: 1.0 T pairs/s on an H100, 10%
of the fp32 floor (benchmarks/results/bench_swaps_v1_3dtile.json).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def _has_gluon_async_copy() -> bool:
    """Whether this Triton has Gluon with cp.async (older builds lack one or both)."""
    try:
        return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.ampere.async_copy") is not None
    except ModuleNotFoundError:
        return False


AVAILABLE = importlib.util.find_spec("triton") is not None
GLUON = AVAILABLE and _has_gluon_async_copy()
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
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    def _gluon_config(block_r, block_j, per_thread_r, per_thread_j, threads_r, chunk, stages):
        """A tile, the blocked layout that spreads it over 4 warps, and the shared-memory pipeline."""
        return triton.Config({"BLOCK_R": block_r, "BLOCK_J": block_j, "CHUNK": chunk, "STAGES": stages,
                              "SPT_R": per_thread_r, "SPT_J": per_thread_j, "TPW_R": threads_r, "WARPS": 4},
                             num_warps=4, num_stages=1)

    # 128 x 64 with 4 x 8 values per thread won on the H100 at 4096 x 4096 (8.6-8.7 ms for every chunk
    # and stage count here); the smaller tiles give narrow layers enough programs to fill the GPU.
    GLUON_CONFIGS = [_gluon_config(128, 64, 4, 8, 8, 8, 3), _gluon_config(128, 64, 4, 8, 8, 16, 2),
                     _gluon_config(64, 128, 4, 8, 4, 8, 3), _gluon_config(64, 64, 4, 8, 4, 16, 2),
                     _gluon_config(32, 64, 2, 8, 4, 16, 2)]
    CHUNK_MULTIPLE = 16   # every config's CHUNK divides it: restore_t is padded to a multiple of it

    @gluon.jit
    def _scan_gluon(gram, weight, scale_t, restore_t, low, rows, d, rows_bucket,
                    BLOCK_R: gl.constexpr, BLOCK_J: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr,
                    SPT_R: gl.constexpr, SPT_J: gl.constexpr, TPW_R: gl.constexpr,
                    WARPS: gl.constexpr):  # pragma: no cover
        """restore_t has at least cdiv(d, CHUNK) * CHUNK rows, +inf past d."""
        layout: gl.constexpr = gl.BlockedLayout([SPT_R, SPT_J], [TPW_R, 32 // TPW_R], [WARPS, 1], [1, 0])
        smem_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        dtype: gl.constexpr = gram.dtype.element_ty   # float32, or float16 for the filtering scan
        g_smem = gl.allocate_shared_memory(dtype, [STAGES, CHUNK, BLOCK_J], smem_layout)
        s_smem = gl.allocate_shared_memory(dtype, [STAGES, CHUNK, BLOCK_R], smem_layout)
        a_smem = gl.allocate_shared_memory(dtype, [STAGES, CHUNK, BLOCK_R], smem_layout)
        pid_r = gl.program_id(0)
        pid_j = gl.program_id(1)
        r = pid_r * BLOCK_R + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
        j = pid_j * BLOCK_J + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, layout))
        rj_ok = gl.expand_dims(r < rows, 1) & gl.expand_dims(j < d, 0)
        w = gl.load(weight + gl.expand_dims(r, 1) * d + gl.expand_dims(j, 0), mask=rj_ok, other=0.0)
        acc = gl.full([BLOCK_R, BLOCK_J], float("inf"), dtype, layout=layout)
        chunks = gl.cdiv(d, CHUNK)
        for k in gl.static_range(STAGES - 1):
            _stage_chunk(g_smem.index(k), s_smem.index(k), a_smem.index(k), gram, scale_t, restore_t, k,
                         rows, d, chunks * CHUNK, pid_r, pid_j, BLOCK_R, BLOCK_J, CHUNK, WARPS)
        for k in range(chunks):
            async_copy.wait_group(STAGES - 2)
            gl.thread_barrier()   # chunk k has landed, and every warp is done with the stage refilled next
            refill = (k + STAGES - 1) % STAGES
            _stage_chunk(g_smem.index(refill), s_smem.index(refill), a_smem.index(refill), gram, scale_t,
                         restore_t, k + STAGES - 1, rows, d, chunks * CHUNK, pid_r, pid_j,
                         BLOCK_R, BLOCK_J, CHUNK, WARPS)
            stage = k % STAGES
            for c in gl.static_range(CHUNK):
                g = g_smem.index(stage).slice(c, 1).load(layout)                     # G_ij: [1, BLOCK_J]
                s = s_smem.index(stage).slice(c, 1).permute([1, 0]).load(layout)     # -2 w_ri: [BLOCK_R, 1]
                a = a_smem.index(stage).slice(c, 1).permute([1, 0]).load(layout)     # a_ri: [BLOCK_R, 1]
                acc = gl.minimum(acc, (w * g) * s + a)
        gl.store(low + gl.expand_dims(r, 1) * d + gl.expand_dims(j, 0), acc, mask=rj_ok)

    _low_kernel_gluon = triton.autotune(configs=GLUON_CONFIGS, key=["d", "rows_bucket"])(_scan_gluon)
    # float16 values take half the registers, so a tile twice as wide fits as well.
    _low_kernel_gluon_half = triton.autotune(configs=GLUON_CONFIGS + [_gluon_config(128, 128, 4, 8, 8, 8, 3)],
                                             key=["d", "rows_bucket"])(_scan_gluon)

    @gluon.jit
    def _stage_chunk(g_stage, s_stage, a_stage, gram, scale_t, restore_t, chunk, rows, d, d_padded, pid_r, pid_j,
                     BLOCK_R: gl.constexpr, BLOCK_J: gl.constexpr, CHUNK: gl.constexpr,
                     WARPS: gl.constexpr):  # pragma: no cover
        """Start copying chunk `chunk` (CHUNK values of i) of G's rows and of the row terms into one stage.
        Past the end the copies zero-fill, except a (padded with +inf), so those i never win."""
        g_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BLOCK_J // 4), BLOCK_J // 4], [WARPS, 1], [1, 0])
        r_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BLOCK_R // 4), BLOCK_R // 4], [WARPS, 1], [1, 0])
        i = chunk * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, g_copy))
        j = pid_j * BLOCK_J + gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, g_copy))
        async_copy.async_copy_global_to_shared(g_stage, gram + gl.expand_dims(i, 1) * d + gl.expand_dims(j, 0),
                                               mask=gl.expand_dims(i < d, 1) & gl.expand_dims(j < d, 0))
        i = chunk * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, r_copy))
        r = pid_r * BLOCK_R + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(0, r_copy))
        offsets = gl.expand_dims(i, 1) * rows + gl.expand_dims(r, 0)
        r_ok = gl.expand_dims(r < rows, 0)
        async_copy.async_copy_global_to_shared(s_stage, scale_t + offsets, mask=gl.expand_dims(i < d, 1) & r_ok)
        async_copy.async_copy_global_to_shared(a_stage, restore_t + offsets,
                                               mask=gl.expand_dims(i < d_padded, 1) & r_ok)
        async_copy.commit_group()


def scan_per_row_triton(w, mask, c, gram, pattern, kernel: str = "auto"):
    """Best (Δ, i, j) per row over (pruned i, kept j) pairs; float32 CUDA tensors.
    `kernel`: "gluon", "triton", or "auto" (Gluon where this Triton has it)."""
    from .swaps import masked_swap_terms

    if w.dtype != torch.float32:
        raise ValueError("the Triton scan computes in float32 (dtype='float32')")
    low_kernel = _choose_kernel(kernel)
    restore, prune = masked_swap_terms(w, mask, c, gram)
    scale = -2 * w
    low = _launch(low_kernel, w, scale, restore, gram)
    best, j = (low + prune).min(1)                    # first minimum: smallest j on ties
    # i of the winning j: the pruned i minimising a_i - 2 w_i w_j G_ji (one column of G per row).
    column = gram[j] * w.gather(1, j.unsqueeze(1))
    i = (restore + scale * column).argmin(1)
    return best, i, j


def half_low(w, scale, restore, gram):
    """low[r, j] ≈ min_i (a_ri - 2 w_ri w_rj G_ij) from the Gluon kernel in float16, as float32.

    Every row is scaled into float16's range: the kernel gets w' = w / max|w_r|, G' = G / max|G|,
    s' = λ_r s max|G| max|w_r| and a' = λ_r a, so (w'_j G'_ij) s'_i + a'_i = λ_r (a_i + s_i w_j G_ij) with
    |a'|, |s'|, |w' G'| <= 1; λ_r is divided out of the result."""
    if not GLUON:
        raise ValueError(f"the float16 scan needs a Triton with Gluon (triton.experimental.gluon); this one "
                         f"({triton.__version__}) has none: use dtype='float32' or upgrade Triton")
    tiny = torch.finfo(torch.float32).tiny
    gram_max = gram.abs().max().clamp_min(tiny)
    w_max = w.abs().amax(1, keepdim=True).clamp_min(tiny)
    scale = scale * (gram_max * w_max)
    largest = torch.maximum(torch.where(restore.isinf(), 0, restore).abs().amax(1, keepdim=True),
                            scale.abs().amax(1, keepdim=True))
    lam = 1 / largest.clamp_min(tiny)
    # cp.async moves at least 4 bytes: float16 rows of G and of the row terms must start 4-byte aligned, so
    # rows and d are padded to multiples of 16 (padded rows and i never win: w = s = 0, a = +inf).
    rows, d = w.shape
    pad = (0, -d % 16, 0, -rows % 16)
    low = _launch(_low_kernel_gluon_half, F.pad((w / w_max).half(), pad), F.pad((scale * lam).half(), pad),
                  F.pad((restore * lam).half(), pad, value=float("inf")),
                  F.pad((gram / gram_max).half(), (0, -d % 16, 0, -d % 16)))
    return low[:rows, :d].float().div_(lam)


def _launch(low_kernel, w, scale, restore, gram):
    """low[r, j] = min_i (restore_ri + scale_ri w_rj G_ij), in the inputs' dtype."""
    rows, d = w.shape
    low = torch.empty(rows, d, device=w.device, dtype=w.dtype)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_J"])

    low_kernel[grid](gram.contiguous(), w.contiguous(), scale.T.contiguous(), _restore_rows(restore, low_kernel),
                     low, rows, d, _bucket(rows))
    return low


def _restore_rows(restore, low_kernel):
    """The restore terms i-major; for the Gluon kernel padded with +inf to whole chunks of i."""
    if low_kernel is _low_kernel:
        return restore.T.contiguous()
    rows, d = restore.shape
    padded = torch.full((triton.cdiv(d, CHUNK_MULTIPLE) * CHUNK_MULTIPLE, rows), float("inf"),
                        device=restore.device, dtype=restore.dtype)
    padded[:d] = restore.T
    return padded


def _choose_kernel(kernel: str):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "gluon" and not GLUON:
        raise ValueError(f"kernel 'gluon' needs a Triton with triton.experimental.gluon; this one "
                         f"({triton.__version__}) has none: use kernel='triton' or upgrade Triton")
    return _low_kernel_gluon if kernel == "gluon" or (kernel == "auto" and GLUON) else _low_kernel


def tuned_config(kernel: str = "auto", half: bool = False) -> str | None:
    """The tile configuration the autotuner chose for the last shape `kernel` (or, with `half`, the float16
    filter's kernel) scanned; None before any scan."""
    if half:
        chosen = getattr(_low_kernel_gluon_half, "best_config", None) if GLUON else None
    else:
        chosen = getattr(_choose_kernel(kernel), "best_config", None) if AVAILABLE else None
    return None if chosen is None else str(chosen)


def _bucket(rows: int) -> int:
    """Autotuning key: the kernel's best tile depends on the rows only coarsely."""
    return 1 << max(0, rows - 1).bit_length()
