"""Fused GPU scan for the per-row 1-swap search (Triton).

For a batch of rows, every (pruned i, kept j) pair is scored without materialising the rows x d x d
tensor. A program owns BLOCK_R rows x BLOCK_J columns j and walks i over the whole width, keeping an
elementwise running minimum
    low[r, j] = min_i (a_ri - 2 w_ri w_rj G_ij)        (a_ri = +inf for kept i)
so the inner loop is three fp32 instructions per pair (FMUL, FFMA, FMNMX) and no reduction; each row of
G (BLOCK_J values) is loaded once per i and used for all BLOCK_R rows. Its epilogue adds b_rj (+inf for
pruned j) and keeps each row's two best j of the tile, one slot per 64 columns. The kernel covers the full
d x d square so rows can share G; the share of useful pairs is p*k/d².

Around it, small kernels replace what were a dozen torch passes over rows x d per iteration:
`_terms_kernel` computes a, b and the kernel's i-major operands from w, c (float64) and the mask in one
pass; `_rescore_kernel` finds, for a row's winning j (or the float16 filter's candidates), the best i
exactly in float32 from one row of G (G is symmetric); `_settle_kernel` re-checks each swap in float64
and applies it to the masks and counters, `_update_c_kernel` to c in float64.
Exact ties go to the smallest j, then the smallest i. The driver re-checks every chosen swap in float64.

Two implementations of the same arithmetic. `_low_kernel_gluon` (Gluon, Triton's explicit-layout
dialect) copies chunks of i (G's rows and the rows' terms) into shared memory with asynchronous copies
(cp.async), several chunks ahead, and reads each i's values there straight in the accumulator's layout:
no layout conversions, two barriers per chunk. On the H100 it runs 4096 x 4096 in 8.6 ms against 16.6 ms
for the plain Triton `_low_kernel` and 11.0 ms for a Gluon kernel loading from global memory into
registers (benchmarks/results/scan_sass_h100.md). The Triton kernel stays as the fallback for Triton
builds without Gluon, an experimental API.

The Gluon kernel also runs in float16 (`half_shortlist`: packed HMUL2/HFMA2/HMNMX2, 1.5 instructions per
pair) on operands scaled per row; solvers/swaps.py uses it only as a filter whose candidates it re-scores
in float32 (dtype="float16"). On the H100 the whole filtered scan of 4096 x 4096 takes 5.2 ms against
8.6 ms in float32: HFMA2 issues at half the FFMA rate there, so the float16 FMA rate is about the float32
one (benchmarks/results/bench_swaps_half.md).

A first version tiled [rows, i, j] and reduced over j inside every tile: 1.0 T pairs/s on an H100, 10%
of the fp32 floor (benchmarks/results/bench_swaps_v1_3dtile.json).
"""
from __future__ import annotations

import importlib.util
from functools import partial
from typing import NamedTuple

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

    MIN_BLOCK_J = 64   # every config's BLOCK_J is a multiple: the kernels write one slot per 64 columns j
    CHUNK_MULTIPLE = 16   # every Gluon config's CHUNK divides it: restore_t is padded to a multiple of it
    _MIN_BLOCK_J = tl.constexpr(MIN_BLOCK_J)

    @triton.autotune(configs=CONFIGS, key=["d", "rows_bucket"])
    @triton.jit
    def _low_kernel(gram, weight, scale_t, restore_t, prune, inv_scale, tile_val, tile_j, rows, d, slots,
                    rows_bucket, SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                    UNROLL: tl.constexpr):  # pragma: no cover
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
        # + b (+inf for pruned j); SCALED is float16 only, which this kernel never runs
        best = acc + tl.load(prune + r[:, None] * d + j[None, :], mask=rj_ok, other=float("inf"))
        slot = 2 * (r * slots + pid_j * (BLOCK_J // _MIN_BLOCK_J))
        for rank in tl.static_range(2):
            value = tl.min(best, 1)
            first = tl.min(tl.where(best == value[:, None], j[None, :], 2147483647), 1)   # smallest j on ties
            tl.store(tile_val + slot + rank, value, mask=r_ok)
            tl.store(tile_j + slot + rank, first, mask=r_ok)
            best = tl.where(j[None, :] == first[:, None], float("inf"), best)


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

    @gluon.jit
    def _scan_gluon(gram, weight, scale_t, restore_t, prune, inv_scale, tile_val, tile_j, rows, d, slots,
                    rows_bucket, SCALED: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_J: gl.constexpr,
                    CHUNK: gl.constexpr, STAGES: gl.constexpr, SPT_R: gl.constexpr, SPT_J: gl.constexpr,
                    TPW_R: gl.constexpr, WARPS: gl.constexpr):  # pragma: no cover
        """restore_t has at least cdiv(d, CHUNK) * CHUNK rows, +inf past d. With SCALED (float16), row r's
        values are λ_r times the true ones and inv_scale holds 1 / λ_r."""
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
        _store_tile_best(acc, r, j, prune, inv_scale, tile_val, tile_j, rows, d, slots, pid_j, SCALED, BLOCK_J)

    @gluon.jit
    def _store_tile_best(acc, r, j, prune, inv_scale, tile_val, tile_j, rows, d, slots, pid_j,
                         SCALED: gl.constexpr, BLOCK_J: gl.constexpr):  # pragma: no cover
        """Each row's two best (low + b, j) of the tile into its slot (smallest j on ties), in float32."""
        best = acc.to(gl.float32)
        if SCALED:
            best = best * gl.expand_dims(gl.load(inv_scale + r, mask=r < rows, other=1.0), 1)
        rj_ok = gl.expand_dims(r < rows, 1) & gl.expand_dims(j < d, 0)
        best = best + gl.load(prune + gl.expand_dims(r, 1) * d + gl.expand_dims(j, 0), mask=rj_ok,
                              other=float("inf"))
        slot = 2 * (r * slots + pid_j * (BLOCK_J // _MIN_BLOCK_J))
        for rank in gl.static_range(2):
            value = gl.min(best, axis=1)
            first = gl.min(gl.where(best == gl.expand_dims(value, 1), gl.expand_dims(j, 0), 2147483647), axis=1)
            gl.store(tile_val + slot + rank, value, mask=r < rows)
            gl.store(tile_j + slot + rank, first, mask=r < rows)
            best = gl.where(gl.expand_dims(j, 0) == gl.expand_dims(first, 1), float("inf"), best)

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


if AVAILABLE:
    TINY = 1.1754943508222875e-38   # smallest normal float32: keeps the scale factors finite
    _TINY = tl.constexpr(TINY)

    @triton.jit
    def _row_terms(weight, c, mask, diag, r, i, rows, d):  # pragma: no cover
        """(w, a, b) of a [rows, columns] tile: a = +inf where i is kept or outside, b = +inf where j is
        pruned or outside."""
        inside = (r < rows)[:, None] & (i < d)[None, :]
        offsets = r[:, None] * d + i[None, :]
        w = tl.load(weight + offsets, mask=inside, other=0.0)
        c_ = tl.load(c + offsets, mask=inside, other=0.0).to(tl.float32)
        kept = tl.load(mask + offsets, mask=inside, other=1) != 0
        w2g = w * w * tl.load(diag + i, mask=i < d, other=0.0)[None, :]
        a = tl.where(kept, float("inf"), w2g - 2 * w * c_)
        b = tl.where(kept & inside, w2g + 2 * w * c_, float("inf"))
        return w, a, b

    @triton.jit
    def _terms_kernel(weight, c, mask, diag, restore, prune, restore_t, scale_t, weight_k, inv_scale,
                      rows, d, rows_k, d_k, d_t, gram_max, SCALED: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # pragma: no cover
        """The scan's operands for rows_k x d_k (rows and d padded): restore and prune row-major in float32,
        restore_t and scale_t = -2 w i-major (d_t rows) in the scan's dtype. With SCALED (float16) each row
        is scaled into float16's range: weight_k = w / max|w_r|, scale_t = λ_r s max|G| max|w_r|,
        restore_t = λ_r a with λ_r = 1 / max(|a|, |s| max|G| max|w_r|), and inv_scale = 1 / λ_r."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        lam = tl.full([BLOCK_R], 1.0, tl.float32)
        w_max = tl.full([BLOCK_R], 1.0, tl.float32)
        if SCALED:
            w_max = tl.zeros([BLOCK_R], tl.float32)
            a_max = tl.zeros([BLOCK_R], tl.float32)
            for start in range(0, d, BLOCK_D):
                w, a, _ = _row_terms(weight, c, mask, diag, r, start + tl.arange(0, BLOCK_D), rows, d)
                w_max = tl.maximum(w_max, tl.max(tl.abs(w), 1))
                a_max = tl.maximum(a_max, tl.max(tl.where(a == float("inf"), 0.0, tl.abs(a)), 1))
            w_max = tl.maximum(w_max, _TINY)
            lam = 1 / tl.maximum(tl.maximum(a_max, 2 * w_max * w_max * gram_max), _TINY)
            tl.store(inv_scale + r, 1 / lam, mask=r < rows_k)
        for start in range(0, d_t, BLOCK_D):
            i = start + tl.arange(0, BLOCK_D)
            w, a, b = _row_terms(weight, c, mask, diag, r, i, rows, d)
            row_major = r[:, None] * d_k + i[None, :]
            in_k = (r < rows_k)[:, None] & (i < d_k)[None, :]
            tl.store(restore + row_major, a, mask=in_k)
            tl.store(prune + row_major, b, mask=in_k)
            s = -2 * w
            if SCALED:
                tl.store(weight_k + row_major, (w / w_max[:, None]).to(weight_k.dtype.element_ty), mask=in_k)
                a = a * lam[:, None]
                s = s * (lam * gram_max * w_max)[:, None]
            i_major = i[None, :] * rows_k + r[:, None]
            in_t = (r < rows_k)[:, None] & (i < d_t)[None, :]
            tl.store(restore_t + i_major, a.to(restore_t.dtype.element_ty), mask=in_t)
            tl.store(scale_t + i_major, s.to(scale_t.dtype.element_ty), mask=in_t)

    @triton.jit
    def _rescore_kernel(gram, weight, restore, prune, top, best, best_i, best_j, d, d_k, K: tl.constexpr,
                        K_POW2: tl.constexpr, BLOCK_D: tl.constexpr):  # pragma: no cover
        """Row r's exact best (Δ, i, j) over every pruned i and the K candidate j in top[r] (float32, the
        scan's arithmetic (w_j G_ij) s_i + a_i). Ties go to the smallest i, then the smallest j."""
        r = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, K_POW2)
        j = tl.load(top + r * K + k, mask=k < K, other=0)
        j_ok = (k < K) & (j < d)
        w_j = tl.load(weight + r * d + j, mask=j_ok, other=0.0)
        low = tl.full([K_POW2, BLOCK_D], float("inf"), tl.float32)
        low_i = tl.zeros([K_POW2, BLOCK_D], tl.int64)
        for start in range(0, d, BLOCK_D):
            i = start + tl.arange(0, BLOCK_D)
            i_ok = i < d
            s = -2 * tl.load(weight + r * d + i, mask=i_ok, other=0.0)
            a = tl.load(restore + r * d_k + i, mask=i_ok, other=float("inf"))
            g = tl.load(gram + j[:, None] * d + i[None, :], mask=j_ok[:, None] & i_ok[None, :], other=0.0)
            value = (w_j[:, None] * g) * s[None, :] + a[None, :]
            better = value < low                     # strict: the first i of each lane stays on ties
            low = tl.where(better, value, low)
            low_i = tl.where(better, i[None, :].to(tl.int64), low_i)
        per_j = tl.min(low, 1)
        per_j_i = tl.min(tl.where(low == per_j[:, None], low_i, d), 1)
        delta = tl.where(j_ok, per_j + tl.load(prune + r * d_k + j, mask=j_ok, other=float("inf")), float("inf"))
        value = tl.min(delta, 0)
        pairs = d.to(tl.int64) * d
        order = tl.where(delta == value, per_j_i * d + j, pairs)
        chosen = tl.min(order, 0)
        found = chosen < pairs
        tl.store(best + r, value)
        tl.store(best_i + r, tl.where(found, chosen // d, 0))
        tl.store(best_j + r, tl.where(found, chosen % d, 0))

    @triton.jit
    def _update_c_kernel(c, weight, gram, i, j, improving, d, BLOCK: tl.constexpr):  # pragma: no cover
        """c[r] += w_rj G[j] - w_ri G[i] for row r = program 0's index, where improving[r]."""
        r = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = (columns < d) & (tl.load(improving + r) != 0)
        i_, j_ = tl.load(i + r), tl.load(j + r)
        w_i, w_j = tl.load(weight + r * d + i_), tl.load(weight + r * d + j_)
        g_i = tl.load(gram + i_ * d + columns, mask=ok)
        g_j = tl.load(gram + j_ * d + columns, mask=ok)
        row = c + r * d + columns
        tl.store(row, tl.load(row, mask=ok) + (w_j * g_j - w_i * g_i), mask=ok)

    @triton.jit
    def _settle_kernel(best, i, j, weight, c, gram, work_mask, mask, ids, swaps, converged, done, improving,
                       going_on, n, d, max_iters, BLOCK: tl.constexpr):  # pragma: no cover
        """Per row p of the working set (row ids[p] of the batch): Δ of its swap (i, j) recomputed in float64
        from the float64 state; if it and the scan's Δ are < 0, restore i and prune j in both masks; count
        the iteration and the swap or the convergence."""
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < n
        i_, j_ = tl.load(i + p, mask=ok, other=0), tl.load(j + p, mask=ok, other=0)
        w_i, w_j = tl.load(weight + p * d + i_, mask=ok, other=0.0), tl.load(weight + p * d + j_, mask=ok, other=0.0)
        c_i, c_j = tl.load(c + p * d + i_, mask=ok, other=0.0), tl.load(c + p * d + j_, mask=ok, other=0.0)
        g_ii = tl.load(gram + i_ * d + i_, mask=ok, other=0.0)
        g_jj = tl.load(gram + j_ * d + j_, mask=ok, other=0.0)
        g_ij = tl.load(gram + i_ * d + j_, mask=ok, other=0.0)
        exact = w_i * w_i * g_ii - 2 * w_i * c_i + w_j * w_j * g_jj + 2 * w_j * c_j - 2 * w_i * w_j * g_ij
        swap = ok & (tl.load(best + p, mask=ok, other=0.0) < 0) & (exact < 0)
        r = tl.load(ids + p, mask=ok, other=0)
        one, zero = tl.full([BLOCK], 1, tl.uint8), tl.full([BLOCK], 0, tl.uint8)
        tl.store(work_mask + p * d + i_, one, mask=swap)
        tl.store(work_mask + p * d + j_, zero, mask=swap)
        tl.store(mask + r * d + i_, one, mask=swap)
        tl.store(mask + r * d + j_, zero, mask=swap)
        tl.store(swaps + r, tl.load(swaps + r, mask=ok, other=0) + swap.to(tl.int64), mask=ok)
        tl.store(converged + r, one, mask=ok & ~swap)
        iterations = tl.load(done + r, mask=ok, other=0) + 1
        tl.store(done + r, iterations, mask=ok)
        tl.store(improving + p, swap.to(tl.uint8), mask=ok)
        tl.store(going_on + p, (swap & (iterations < max_iters)).to(tl.uint8), mask=ok)


    @triton.jit
    def _candidate_kernel(top, active, weight, c, gram, diag, work_mask, mask, ids, swaps, d, K: tl.constexpr,
                          BLOCK: tl.constexpr):  # pragma: no cover
        """Row p of the working set, float64 throughout: for each candidate column j in top[p] in turn, the
        pruned i minimising Δ_ij = a_i + b_j - 2 w_i w_j G_ij on the current state; where j is still kept and
        Δ < 0, restore i, prune j (both masks) and update c. Ties go to the smallest i."""
        p = tl.program_id(0).to(tl.int64)
        row_active = tl.load(active + p) != 0
        r = tl.load(ids + p)
        count = tl.zeros([], tl.int64)
        for k in range(0, K):
            j = tl.load(top + p * K + k)
            w_j, c_j = tl.load(weight + p * d + j), tl.load(c + p * d + j)
            prune_j = w_j * w_j * tl.load(diag + j) + 2 * w_j * c_j
            best = tl.full([], float("inf"), tl.float64)
            best_i = tl.zeros([], tl.int64) + d
            for start in range(0, d, BLOCK):
                i = start + tl.arange(0, BLOCK)
                ok = i < d
                w = tl.load(weight + p * d + i, mask=ok, other=0.0)
                kept = tl.load(work_mask + p * d + i, mask=ok, other=1) != 0
                restore = w * w * tl.load(diag + i, mask=ok, other=0.0) - 2 * w * tl.load(c + p * d + i, mask=ok,
                                                                                            other=0.0)
                value = tl.where(kept, float("inf"), restore - 2 * w * w_j * tl.load(gram + j * d + i, mask=ok,
                                                                                       other=0.0))
                low = tl.min(value, 0)
                low_i = tl.min(tl.where(value == low, i, d), 0).to(tl.int64)
                better = low < best
                best_i = tl.where(better, low_i, best_i)
                best = tl.where(better, low, best)
            j_kept = tl.load(work_mask + p * d + j) != 0
            swap = row_active & j_kept & (best + prune_j < 0) & (best_i < d)
            i_ = tl.where(swap, best_i, j)
            w_i = tl.load(weight + p * d + i_)
            tl.debug_barrier()          # every thread has read the state before any writes it
            one, zero = tl.full([], 1, tl.uint8), tl.full([], 0, tl.uint8)
            tl.store(work_mask + p * d + i_, one, mask=swap)
            tl.store(work_mask + p * d + j, zero, mask=swap)
            tl.store(mask + r * d + i_, one, mask=swap)
            tl.store(mask + r * d + j, zero, mask=swap)
            for start in range(0, d, BLOCK):
                columns = start + tl.arange(0, BLOCK)
                ok = (columns < d) & swap
                step = w_j * tl.load(gram + j * d + columns, mask=ok, other=0.0) - w_i * tl.load(
                    gram + i_ * d + columns, mask=ok, other=0.0)
                tl.store(c + p * d + columns, tl.load(c + p * d + columns, mask=ok, other=0.0) + step, mask=ok)
            tl.debug_barrier()          # the next candidate reads the updated state
            count += swap.to(tl.int64)
        tl.store(swaps + r, tl.load(swaps + r) + count)


class ScanTerms(NamedTuple):
    """The operands of one scan (see _terms_kernel); rows_k x d_k is what the kernel sees."""
    restore: torch.Tensor
    prune: torch.Tensor
    restore_t: torch.Tensor
    scale_t: torch.Tensor
    weight_k: torch.Tensor
    inv_scale: torch.Tensor | None


def scan_terms(w, mask, c, gram, half: bool = False) -> ScanTerms:
    """The scan's operands in one pass over w, c and the mask. float16 pads rows and d to multiples of 16:
    cp.async moves at least 4 bytes, so float16 rows must start 4-byte aligned (padded rows and i never win)."""
    rows, d = w.shape
    rows_k, d_k = (rows + -rows % 16, d + -d % 16) if half else (rows, d)
    d_t = triton.cdiv(d_k, CHUNK_MULTIPLE) * CHUNK_MULTIPLE
    scan_dtype = torch.float16 if half else torch.float32
    new = partial(torch.empty, device=w.device)
    terms = ScanTerms(new(rows_k, d_k), new(rows_k, d_k), new(d_t, rows_k, dtype=scan_dtype),
                      new(d_t, rows_k, dtype=scan_dtype), new(rows_k, d_k, dtype=torch.float16) if half else w,
                      new(rows_k) if half else None)
    gram_max = _half_gram(gram)[1] if half else 1.0
    block_r = 16
    _terms_kernel[(triton.cdiv(rows_k, block_r),)](
        w.contiguous(), c.contiguous(), mask.contiguous().view(torch.uint8), gram.diagonal().contiguous(),
        terms.restore, terms.prune, terms.restore_t, terms.scale_t, terms.weight_k, terms.inv_scale,
        rows, d, rows_k, d_k, d_t, gram_max, SCALED=half, BLOCK_R=block_r, BLOCK_D=128)
    return terms


def rescore(w, terms: ScanTerms, gram, top) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact best (Δ, i, j) per row over every pruned i and the candidate j in `top` ([rows, K])."""
    rows, d = w.shape
    k = top.shape[1]
    best = torch.empty(rows, device=w.device)
    best_i, best_j = (torch.empty(rows, dtype=torch.long, device=w.device) for _ in range(2))
    _rescore_kernel[(rows,)](gram.contiguous(), w.contiguous(), terms.restore, terms.prune, top.contiguous(),
                             best, best_i, best_j, d, terms.restore.shape[1], K=k,
                             K_POW2=triton.next_power_of_2(k), BLOCK_D=256)
    return best, best_i, best_j


def update_c(c, w, gram, i, j, improving) -> None:
    """In place, on CUDA: c[r] += w[r, j_r] G[j_r] - w[r, i_r] G[i_r] in the rows where `improving`.
    The kernel reads i, j and `improving` as dense arrays: strided views (a column of a candidate list)
    are made contiguous first."""
    rows, d = c.shape
    if rows:
        block = 1024
        _update_c_kernel[(rows, triton.cdiv(d, block))](c, w.contiguous(), gram.contiguous(), i.contiguous(),
                                                        j.contiguous(), improving.contiguous().view(torch.uint8),
                                                        d, BLOCK=block)


def settle(rows, progress, best, i, j, gram64, max_iters) -> torch.Tensor:
    """swaps.settle_torch on CUDA in two kernels (_settle_kernel, then update_c): the float64 check of each
    working row's swap, applied to `rows` (swaps.Rows) and `progress` (swaps.Progress). Returns whether each
    row goes on."""
    n, d = rows.c64.shape
    improving, going_on = (torch.empty(n, dtype=torch.bool, device=rows.c64.device) for _ in range(2))
    block = 256
    as_bytes = [t.view(torch.uint8) for t in (rows.mask, progress.mask, progress.converged, improving, going_on)]
    _settle_kernel[(triton.cdiv(n, block),)](best, i, j, rows.w64, rows.c64, gram64, as_bytes[0], as_bytes[1],
                                            rows.ids, progress.swaps, as_bytes[2], progress.done, as_bytes[3],
                                            as_bytes[4], n, d, max_iters, BLOCK=block)
    update_c(rows.c64, rows.w64, gram64, i, j, improving)
    return going_on


def candidate_swaps(top, active, rows, progress, gram64) -> None:
    """swaps.candidate_swaps_torch on CUDA in one kernel (one program per row, the candidates in order)."""
    n, d = rows.c64.shape
    if n:
        top = top.contiguous()
        _candidate_kernel[(n,)](top, active.contiguous().view(torch.uint8), rows.w64, rows.c64, gram64,
                                gram64.diagonal().contiguous(), rows.mask.view(torch.uint8),
                                progress.mask.view(torch.uint8), rows.ids, progress.swaps, d, top.shape[1],
                                BLOCK=1024)


def scan_per_row_triton(w, mask, c, gram, pattern, kernel: str = "auto"):
    """Best (Δ, i, j) per row over (pruned i, kept j) pairs; float32 CUDA tensors (c may be float64).
    `kernel`: "gluon", "triton", or "auto" (Gluon where this Triton has it)."""
    if w.dtype != torch.float32:
        raise ValueError("the Triton scan computes in float32 (dtype='float32')")
    low_kernel = _choose_kernel(kernel)
    terms = scan_terms(w, mask, c, gram)
    tile_val, tile_j = _launch(low_kernel, terms, gram)
    j = tile_j.gather(1, tile_val.argmin(1, keepdim=True))       # first minimum: smallest j on ties
    return rescore(w, terms, gram, j.long())


def scan_candidates(w, mask, c, gram, pattern=None, k: int = 8, half: bool = False, shortlist: int = 4):
    """One scan's best (Δ, i, j) per row (float32: `scan_per_row_triton`'s pair; float16: the best of the
    first `shortlist` candidates re-scored in float32, as `half_shortlist`) and the row's k best candidate columns j [rows, k], by the
    per-tile minima, best first. Slots no tile wrote give column 0, which the caller re-checks like any."""
    if half:
        terms = scan_terms(w, mask, c, gram, half=True)
        tile_val, tile_j = _launch(_low_kernel_gluon_half, terms, _half_gram(gram)[0])
    else:
        terms = scan_terms(w, mask, c, gram)
        tile_val, tile_j = _launch(_choose_kernel("auto"), terms, gram)
    tile_val, tile_j = tile_val[: len(w)], tile_j[: len(w)]
    order = tile_val.topk(min(k, tile_val.shape[1]), 1, largest=False).indices
    top = tile_j.gather(1, order).long()
    if half:
        best, i, j = rescore(w, terms, gram, top[:, :shortlist].sort(1).values)
    else:
        best, i, j = rescore(w, terms, gram, tile_j.gather(1, tile_val.argmin(1, keepdim=True)).long())
    return best, i, j, top


def tile_minima(w, mask, c, gram, half: bool = False) -> torch.Tensor:
    """[rows, 2 slots]: each row's two smallest min_i Δ_ij per 64 columns j, from the Gluon kernel in float32
    or in float16 (an estimate)."""
    terms = scan_terms(w, mask, c, gram, half)
    tile_val, _ = _launch(_low_kernel_gluon_half if half else _low_kernel_gluon, terms,
                          _half_gram(gram)[0] if half else gram)
    return tile_val[: len(w)]


def half_shortlist(w, mask, c, gram, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float16 filter: the Gluon kernel in float16 proposes the row's k best j among each 64 columns'
    best two; each is re-scored exactly in float32 over every pruned i (see scan_terms for the scaling)."""
    if not GLUON:
        raise ValueError(f"the float16 scan needs a Triton with Gluon (triton.experimental.gluon); this one "
                         f"({triton.__version__}) has none: use dtype='float32' or upgrade Triton")
    terms = scan_terms(w, mask, c, gram, half=True)
    tile_val, tile_j = _launch(_low_kernel_gluon_half, terms, _half_gram(gram)[0])
    tile_val, tile_j = tile_val[: len(w)], tile_j[: len(w)]
    picks = tile_val.topk(min(k, tile_val.shape[1]), 1, largest=False).indices
    top = tile_j.gather(1, picks).long().sort(1).values
    return rescore(w, terms, gram, top)


def _half_gram(gram) -> tuple[torch.Tensor, float]:
    """(G / max|G| in float16, padded to a multiple of 16, max|G|), computed once per G (and per change of
    it) and kept on the tensor."""
    cached = getattr(gram, "_sparseswaps_half", None)
    if cached is None or cached[0] != gram._version:
        gram_max = float(gram.abs().max().clamp_min(TINY))
        pad = -gram.shape[0] % 16
        cached = (gram._version, F.pad(gram / gram_max, (0, pad, 0, pad)).half(), gram_max)
        gram._sparseswaps_half = cached
    return cached[1], cached[2]


def _launch(low_kernel, terms: ScanTerms, gram) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, j) of each row's two best pairs (in order) per 64 columns j: [rows_k, 2 slots], +inf where no
    tile wrote."""
    rows, d = terms.weight_k.shape
    slots = triton.cdiv(d, MIN_BLOCK_J)
    tile_val = torch.full((rows, 2 * slots), float("inf"), device=gram.device)
    tile_j = torch.zeros(rows, 2 * slots, dtype=torch.int32, device=gram.device)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_J"])

    low_kernel[grid](gram.contiguous(), terms.weight_k.contiguous(), terms.scale_t, terms.restore_t, terms.prune,
                     terms.inv_scale if terms.inv_scale is not None else terms.prune, tile_val, tile_j, rows, d,
                     slots, _bucket(rows), SCALED=terms.inv_scale is not None)
    return tile_val, tile_j


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
    """Autotuning key: the kernel's best tile depends on the rows only coarsely, and not at all below 128
    (the few rows the float16 filter leaves to the exact scan would each cost an autotuning run)."""
    return max(128, 1 << max(0, rows - 1).bit_length())
