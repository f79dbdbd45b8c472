"""SparseSwaps (arXiv 2512.10922): refine a mask with exact best 1-swaps, batched over rows.

The formula (Δ_ij = a_i + b_j - 2 w_i w_j G_ij, with c = G (w ⊙ ¬m)) and a plain reference refinement are in
`swap_formula`; this module is the batched driver. Each iteration every active row applies its best pair if Δ < 0, then c is updated with two columns of G
in O(d). A row stops when no swap improves it (local optimum) or after `max_iters`. N:M swaps stay in
their group. The scan runs in `dtype` (float32 by default); c is kept in float64 and every chosen swap is
re-checked in float64 before it is applied, so the objective never increases.

dtype="float16" (CUDA, Gluon kernel, per-row sparsity) makes the scan a filter: the fused kernel scans in
packed float16 (half the instructions per pair), of each row's two best j per 64 columns the
`FILTER_CANDIDATES` best are re-scored exactly in float32 over every pruned i, and rows where none
improves are scanned again in float32, so a row stops only at a float32 local optimum. Unlike float32 it
is not guaranteed to pick the best pair each iteration (benchmarks/results/bench_swaps_half.md measures
how often it does).

swaps_per_scan=K > 1 takes up to K - 1 further swaps per full scan: the scan's K best candidate columns j
(its per-tile minima), each re-scored over every pruned i on the current state in float64 and applied only
if it still improves. Every applied swap is an exact improving 1-swap and a row still stops only when a
full scan finds none, but the path differs from the paper's best improvement (swaps_per_scan=1, the
default); benchmarks/results/swaps_per_scan.md compares the two.

dtype="auto" (the default) takes the float16 filter where it was measured faster, per-row patterns on CUDA
with Gluon for rows of at least `HALF_MIN_WIDTH` inputs (LLaMA-7B shapes; benchmarks/results/
bench_swaps_half.md), and float32 elsewhere (it was slower on SmolLM2's 576-wide layers); the result's
extra["dtype"] records the choice.

Ties between equal Δ go to the smallest j, then the smallest i, on every engine (the fused kernels' order;
the float16 filter's and several-swaps' re-scoring of candidate columns takes the smallest i first).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from sparseswaps import NM, MaskProblem, PerRow, Solution, Solver, Termination, mask_from_scores, register
from sparseswaps.errors import UserError
from sparseswaps.problem import pruned_first

from . import swaps_cpu, swaps_triton
from .swap_formula import exact_deltas, masked_swap_terms, swap_terms

# Working-set budget of one row batch of the dense CPU scan, in bytes; on CUDA, half the free memory.
_CPU_BATCH_BYTES = 32 << 20
# Bytes per (row, column) of a fused scan's batch: float64 w and c, float32 w, mask, four float32 operand
# arrays, a float64 temporary for c's first product (45), with margin.
_FUSED_BYTES_PER_ENTRY = 64

ScanFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, object],
                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def dense_deltas(w, mask, c, gram) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ of every (pruned i, j) pair [rows, p, d] (+inf where j is not kept) and the pruned indices [rows, p]."""
    d = w.shape[1]
    restore, prune = masked_swap_terms(w, mask, c, gram)
    pruned_count = d - int(mask[0].sum())
    # Pruned indices in ascending order, so a first minimum over them is the smallest i.
    pruned_idx = pruned_first(mask)[:, :pruned_count]
    w_i = torch.gather(w, 1, pruned_idx)
    a_i = torch.gather(restore, 1, pruned_idx)
    delta = gram[pruned_idx]                                   # [rows, p, d]: G_ij
    delta.mul_(w.unsqueeze(1)).mul_(w_i.unsqueeze(2) * -2)
    delta.add_(a_i.unsqueeze(2)).add_(prune.unsqueeze(1))
    return delta, pruned_idx


def _best_pairs(delta, pruned_idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best Δ, i, j, per-column minima) of each row from the dense [rows, p, d] Δ: the minimum over i of
    every column first (first minimum: smallest i), then over j (smallest j), as the fused kernels do."""
    low, low_at = delta.min(1)                                   # [rows, d]
    best, j = low.min(1)
    i = torch.gather(pruned_idx, 1, low_at.gather(1, j.unsqueeze(1))).squeeze(1)
    return best, i, j, low


def scan_per_row(w, mask, c, gram, pattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (Δ, i, j) of each row over every (pruned i, kept j) pair: dense, batched torch."""
    best, i, j, _ = _best_pairs(*dense_deltas(w, mask, c, gram))
    return best, i, j


def scan_candidates_torch(w, mask, c, gram, pattern, k: int):
    """`scan_per_row`'s best (Δ, i, j) and each row's k best columns j by their best pair [rows, k]."""
    best, i, j, low = _best_pairs(*dense_deltas(w, mask, c, gram))
    return best, i, j, low.topk(min(k, w.shape[1]), 1, largest=False).indices


def scan_candidates_half(w, mask, c, gram, pattern, k: int):
    """The float16 filter's best pair (as `scan_filtered`) and its k best candidate columns."""
    best, i, j, top = swaps_triton.scan_candidates(w, mask, c, gram, k=max(k, FILTER_CANDIDATES), half=True,
                                                   shortlist=FILTER_CANDIDATES)
    stuck = (best >= 0).nonzero().flatten()
    if len(stuck):
        best[stuck], i[stuck], j[stuck] = swaps_triton.scan_per_row_triton(w[stuck], mask[stuck], c[stuck], gram,
                                                                           pattern)
    return best, i, j, top


def scan_nm(w, mask, c, gram, pattern: NM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (Δ, i, j) of each row over pairs inside one N:M group."""
    rows, d = w.shape
    m = pattern.m
    groups = d // m
    a, b = swap_terms(w, c, gram.diagonal())
    start = torch.arange(0, d, m, device=w.device)
    offsets = torch.arange(m, device=w.device)
    block = gram[(start[:, None] + offsets)[:, :, None], (start[:, None] + offsets)[:, None, :]]  # [groups, m, m]
    wg, mg = w.view(rows, groups, m), mask.view(rows, groups, m)
    a_i = torch.where(mg, torch.inf, a.view(rows, groups, m))
    b_j = torch.where(mg, b.view(rows, groups, m), torch.inf)
    delta = a_i.unsqueeze(3) + b_j.unsqueeze(2) - 2 * wg.unsqueeze(3) * wg.unsqueeze(2) * block
    best, flat = delta.view(rows, -1).min(1)
    group, within = flat // (m * m), flat % (m * m)
    return best, group * m + within // m, group * m + within % m


FILTER_CANDIDATES = 4

# shortlist(w, mask, c, gram, k): per row the exact best (Δ, i, j) over the k candidate j an approximate scan
# proposes, each re-scored over every pruned i.
Shortlist = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def scan_filtered(w, mask, c, gram, pattern, *, shortlist: Shortlist, exact_scan: ScanFn,
                  candidates: int = FILTER_CANDIDATES):
    """Best (Δ, i, j) per row with an approximate scan as a filter: the exact best pair among the
    `candidates` j the filter ranks first. Rows where none improves go to `exact_scan`, so no row is declared
    a local optimum by mistake."""
    best, i, j = shortlist(w, mask, c, gram, min(candidates, pattern.keep))
    stuck = (best >= 0).nonzero().flatten()
    if len(stuck):
        best[stuck], i[stuck], j[stuck] = exact_scan(w[stuck], mask[stuck], c[stuck], gram, pattern)
    return best, i, j


def rescore_candidates(w, scale, restore, prune, gram, top) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact best (Δ, i, j) per row over every pruned i and the candidate j in `top` ([rows, K], ascending).
    Ties go to the smallest i, then the smallest j, as in the full scan."""
    delta = gram[top]                                                    # [rows, K, d]: G_ji = G_ij
    delta.mul_(w.gather(1, top).unsqueeze(2)).mul_(scale.unsqueeze(1)).add_(restore.unsqueeze(1))
    delta.add_(prune.gather(1, top).unsqueeze(2))
    per_candidate, i_per_candidate = delta.min(2)                        # first minimum: smallest i
    best = per_candidate.min(1).values
    tied = per_candidate == best.unsqueeze(1)
    order = torch.where(tied, i_per_candidate * w.shape[1] + top, torch.iinfo(torch.long).max)
    k = order.argmin(1, keepdim=True)
    return best, i_per_candidate.gather(1, k).squeeze(1), top.gather(1, k).squeeze(1)


ENGINES = ("auto", "torch", "numba", "triton")


def _choose_scan(pattern, device: torch.device, engine: str, dtype: torch.dtype) -> tuple[ScanFn, bool]:
    """(scan function, whether it needs a dense [rows, p, d] working set). N:M scans are always cheap torch,
    exact whatever the dtype."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if isinstance(pattern, NM):
        return scan_nm, True
    if dtype == torch.float16:
        if device.type != "cuda" or engine not in ("auto", "triton") or not swaps_triton.GLUON:
            raise UserError("dtype 'float16' filters with the Gluon GPU kernel: it needs a CUDA device, engine "
                             "'auto' or 'triton' and a Triton with Gluon; use dtype 'float32' otherwise")
        return partial(scan_filtered, shortlist=swaps_triton.half_shortlist,
                       exact_scan=swaps_triton.scan_per_row_triton), False
    if engine == "auto":
        engine = ("numba" if swaps_cpu.AVAILABLE else "torch") if device.type == "cpu" else (
            "triton" if swaps_triton.AVAILABLE else "torch")
    if engine == "triton":
        if device.type != "cuda" or not swaps_triton.AVAILABLE:
            raise UserError("engine 'triton' runs on CUDA devices and needs triton installed")
        return swaps_triton.scan_per_row_triton, False
    if engine == "numba":
        if device.type != "cpu" or not swaps_cpu.AVAILABLE:
            raise UserError("engine 'numba' runs on the CPU and needs numba installed (pip install 'sparseswaps[cpu]')")
        return swaps_cpu.scan_per_row_numba, False
    return scan_per_row, True


def _candidate_scan(scan: ScanFn, pattern, dtype: torch.dtype, k: int) -> tuple[ScanFn, bool]:
    """For swaps_per_scan = k > 1: the scan that also returns each row's k best candidate columns."""
    if isinstance(pattern, NM):
        raise UserError("swaps_per_scan > 1 applies to per-row sparsity; N:M swaps stay in their group, use 1")
    if dtype == torch.float16:
        return partial(scan_candidates_half, k=k), False
    if scan is swaps_triton.scan_per_row_triton:
        return partial(swaps_triton.scan_candidates, k=k), False
    if scan is swaps_cpu.scan_per_row_numba:
        return partial(swaps_cpu.scan_candidates_numba, k=k), False
    return partial(scan_candidates_torch, k=k), True


@dataclass
class Progress:
    """Per row of the problem: its mask, the swaps applied, the iterations run, whether it converged."""
    mask: torch.Tensor
    swaps: torch.Tensor
    done: torch.Tensor
    converged: torch.Tensor

    @classmethod
    def start(cls, mask: torch.Tensor) -> "Progress":
        rows = len(mask)
        return cls(mask.clone(), *(torch.zeros(rows, dtype=t, device=mask.device)
                                   for t in (torch.long, torch.long, torch.bool)))

    def of(self, rows: slice) -> "Progress":
        """The same rows' entries as views, so a batch's updates land in the whole."""
        return Progress(self.mask[rows], self.swaps[rows], self.done[rows], self.converged[rows])


@dataclass
class Rows:
    """The rows of a batch still refining, as compact copies that shrink when rows stop; `ids` are their
    places in the batch's Progress. c64 = G (w ⊙ ¬m) is kept in float64, w in the scan's dtype too."""
    ids: torch.Tensor
    w: torch.Tensor
    w64: torch.Tensor
    mask: torch.Tensor
    c64: torch.Tensor

    @classmethod
    def active(cls, w64: torch.Tensor, progress: Progress, gram64: torch.Tensor, dtype: torch.dtype,
               max_iters: int) -> "Rows":
        ids = ((progress.done < max_iters) & ~progress.converged).nonzero().flatten()
        w64, mask = w64[ids], progress.mask[ids]
        return cls(ids, w64.to(dtype), w64, mask, (w64 * ~mask) @ gram64)

    def keep(self, going_on: torch.Tensor) -> "Rows":
        return Rows(*(t[going_on] for t in (self.ids, self.w, self.w64, self.mask, self.c64)))


def apply_swaps(mask, c, w, gram, i, j, improving) -> None:
    """In place, in the rows where `improving`: restore i and prune j, and update c = G (w ⊙ ¬m) with two
    columns of G. On CUDA without a host synchronisation."""
    rows = torch.arange(len(i), device=mask.device)
    mask[rows, i] |= improving
    mask[rows, j] &= ~improving
    if c.is_cuda and swaps_triton.AVAILABLE:
        swaps_triton.update_c(c, w, gram, i, j, improving)
    else:
        rows = improving.nonzero().flatten()
        c[rows] += w[rows, j[rows], None] * gram[j[rows]] - w[rows, i[rows], None] * gram[i[rows]]


def _record(rows: Rows, progress: Progress, i, j, improving) -> None:
    """The applied swaps of the working rows, in their Progress: both mask entries and the swap count."""
    progress.mask[rows.ids, i] |= improving
    progress.mask[rows.ids, j] &= ~improving
    progress.swaps[rows.ids] += improving


def settle_torch(rows: Rows, progress: Progress, best, i, j, gram64, max_iters: int) -> torch.Tensor:
    """Check each row's swap in float64, apply the improving ones (both masks, c), count the iteration and
    the swap or the convergence; whether each row goes on."""
    improving = (best < 0) & (exact_deltas(rows.w64, rows.c64, gram64, i, j) < 0)
    apply_swaps(rows.mask, rows.c64, rows.w64, gram64, i, j, improving)
    _record(rows, progress, i, j, improving)
    progress.converged[rows.ids] |= ~improving
    progress.done[rows.ids] += 1
    return improving & (progress.done[rows.ids] < max_iters)


def candidate_swaps_torch(top, active, rows: Rows, progress: Progress, gram64) -> None:
    """After a scan's best swap: each candidate column j in turn (one column of every row at a time), with
    its best pruned i on the current state, applied where Δ < 0 in float64: an exact improving 1-swap,
    whatever the scan thought."""
    index = torch.arange(len(rows.ids), device=rows.w64.device)
    for column in top.T.contiguous():
        restore, prune = masked_swap_terms(rows.w64, rows.mask, rows.c64, gram64)
        delta = restore + prune[index, column, None] - 2 * rows.w64 * rows.w64[index, column, None] * gram64[column]
        best, i = delta.min(1)
        improving = active & (best < 0)
        apply_swaps(rows.mask, rows.c64, rows.w64, gram64, i, column, improving)
        _record(rows, progress, i, column, improving)


def candidate_swaps_numba(top, active, rows: Rows, progress: Progress, gram64) -> None:
    """`candidate_swaps_torch` compiled for the CPU (one row per task); the same swaps."""
    progress.swaps[rows.ids] += swaps_cpu.candidate_swaps_numba(top, active, rows.w64, rows.c64, gram64, rows.mask)
    progress.mask[rows.ids] = rows.mask


@dataclass(frozen=True)
class Engine:
    """One device's refinement step, chosen once: the scan, whether it needs the dense [rows, p, d] working
    set, the float64 check and application of each scan's swap (`settle`, which says which rows go on) and,
    for swaps_per_scan > 1, the further candidate swaps."""
    scan: ScanFn
    dense: bool
    settle: Callable[..., torch.Tensor]
    candidate_swaps: Callable[..., None] | None


def choose_engine(pattern, device: torch.device, engine: str = "auto", dtype: torch.dtype = torch.float32,
                  swaps_per_scan: int = 1) -> Engine:
    """The scan `engine` names (auto: the fastest there is on `device`); the float64 steps run as CUDA
    kernels on a GPU with Triton, compiled on a CPU with numba, in torch otherwise."""
    scan, dense = _choose_scan(pattern, device, engine, dtype)
    kernels = device.type == "cuda" and swaps_triton.AVAILABLE
    candidates = None
    if swaps_per_scan > 1:
        scan, dense = _candidate_scan(scan, pattern, dtype, swaps_per_scan)
        candidates = swaps_triton.candidate_swaps if kernels else (
            candidate_swaps_numba if device.type == "cpu" and swaps_cpu.AVAILABLE else candidate_swaps_torch)
    return Engine(scan, dense, swaps_triton.settle if kernels else settle_torch, candidates)


def pairs_per_row(problem_d: int, pattern) -> int:
    if isinstance(pattern, PerRow):
        return (problem_d - pattern.keep) * pattern.keep
    return problem_d // pattern.m * (pattern.m - pattern.n) * pattern.n


def batch_rows_for(d: int, pattern, itemsize: int, device: torch.device, dense: bool = True) -> int:
    """Rows per batch so the scan's working set (dense: [p, d] pairs per row; fused: _FUSED_BYTES_PER_ENTRY
    per entry) fits half the free GPU memory, or a fixed budget on the CPU. An out-of-memory error still
    halves the batch (refine)."""
    if dense:
        per_row = (d * d if isinstance(pattern, PerRow) else d * pattern.m) * itemsize * 2
    else:
        per_row = d * _FUSED_BYTES_PER_ENTRY
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else _CPU_BATCH_BYTES
    return max(1, budget // per_row)


@dataclass
class _Run:
    """What every batch of one refinement shares."""
    engine: Engine
    pattern: object
    gram: torch.Tensor
    gram64: torch.Tensor
    dtype: torch.dtype
    max_iters: int
    deadline: float | None
    pairs: int
    pairs_evaluated: int = 0
    timed_out: bool = False


def refine(problem: MaskProblem, mask: torch.Tensor, *, max_iters: int = 100, batch_rows: int | None = None,
           device=None, dtype: torch.dtype = torch.float32, time_limit: float | None = None,
           engine: str = "auto", swaps_per_scan: int = 1) -> Solution:
    """Run 1-swap refinement of `mask` on `problem`, batch after batch of rows."""
    if max_iters < 0:
        raise UserError(f"max_iters must be >= 0, got {max_iters}")
    if not isinstance(swaps_per_scan, int) or swaps_per_scan < 1:
        raise UserError(f"swaps_per_scan must be a whole number >= 1, got {swaps_per_scan!r}")
    device = torch.device(device) if device is not None else problem.device
    chosen = choose_engine(problem.pattern, device, engine, dtype, swaps_per_scan)
    dtype = torch.float32 if dtype == torch.float16 else dtype    # float16 is only the filter's arithmetic
    run = _Run(chosen, problem.pattern, problem.gram.to(device=device, dtype=dtype), problem.gram.to(device=device, dtype=torch.float64),
               dtype, max_iters, None if time_limit is None else time.monotonic() + time_limit,
               pairs_per_row(problem.d, problem.pattern))
    if batch_rows is None:
        batch_rows = (min(problem.rows, batch_rows_for(problem.d, problem.pattern, run.gram.element_size(), device,
                                                       chosen.dense))
                      if chosen.dense or device.type == "cuda" else problem.rows)
    progress = Progress.start(mask.to(device))
    start = 0
    while start < problem.rows and not run.timed_out:
        rows = slice(start, min(start + batch_rows, problem.rows))
        try:
            _refine_batch(problem.weight[rows].to(device=device, dtype=torch.float64), progress.of(rows), run)
        except torch.cuda.OutOfMemoryError:
            if batch_rows == 1:
                raise
            # Every applied swap is exact, so the batch resumes from where it stood with half the rows.
            batch_rows = max(1, batch_rows // 2)
            torch.cuda.empty_cache()
            continue
        start = rows.stop
    return Solution(progress.mask.to(problem.device), _termination(run, progress),
                    extra={"swaps": progress.swaps.cpu(), "swaps_total": int(progress.swaps.sum()),
                           "converged": progress.converged.cpu(), "rows_converged": int(progress.converged.sum()),
                           "iterations": int(progress.done.max()) if problem.rows else 0,
                           "pairs_evaluated": run.pairs_evaluated, "batch_rows": batch_rows})


def _termination(run: _Run, progress: Progress) -> Termination:
    if run.timed_out:
        return Termination.TIME_LIMIT
    return Termination.LOCAL_OPTIMUM if bool(progress.converged.all()) else Termination.ITERATION_LIMIT


def _refine_batch(w64: torch.Tensor, progress: Progress, run: _Run) -> None:
    """Refine a batch of rows in place. Every applied swap reaches `progress` at once, so an interruption
    (time limit, out of memory) loses nothing. One host synchronisation per iteration (whether any row
    stopped), so the GPU does not wait on Python."""
    rows = Rows.active(w64, progress, run.gram64, run.dtype, run.max_iters)
    while len(rows.ids):
        if run.deadline is not None and time.monotonic() > run.deadline:
            run.timed_out = True
            return
        run.pairs_evaluated += len(rows.ids) * run.pairs
        best, i, j, *candidates = run.engine.scan(rows.w, rows.mask, rows.c64, run.gram, run.pattern)
        going_on = run.engine.settle(rows, progress, best, i, j, run.gram64, run.max_iters)
        if candidates:
            run.engine.candidate_swaps(candidates[0], ~progress.converged[rows.ids], rows, progress, run.gram64)
        if not bool(going_on.all()):
            rows = rows.keep(going_on)


@register("swaps")
class SwapsSolver(Solver):
    """Exact best 1-swaps from a warm start (default: Wanda's mask). CPU or CUDA (option `device`)."""

    warm_start = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, max_iters: int = 100,
              batch_rows: int | None = None, device: str | None = None, dtype: str = "auto",
              engine: str = "auto", swaps_per_scan: int = 1) -> Solution:
        if warm_start is None:
            warm_start = mask_from_scores(problem.wanda_scores(), problem.pattern)
        device = torch.device(device) if device is not None else problem.device
        scan_dtype = _dtype(dtype, problem, device, engine)
        solution = refine(problem, warm_start, max_iters=max_iters, batch_rows=batch_rows, device=device,
                          dtype=scan_dtype, time_limit=time_limit, engine=engine, swaps_per_scan=swaps_per_scan)
        solution.extra["dtype"] = str(scan_dtype).removeprefix("torch.")
        return solution


# Narrowest rows for which dtype="auto" takes the float16 filter (measured faster at 4096 and wider,
# slower at 576; Gemma-3-270M's 2048-wide rows keep float32, as its committed table was made).
HALF_MIN_WIDTH = 4096
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


def _dtype(name: str, problem: MaskProblem, device: torch.device, engine: str) -> torch.dtype:
    if name == "auto":
        half = (device.type == "cuda" and isinstance(problem.pattern, PerRow) and problem.d >= HALF_MIN_WIDTH
                and engine in ("auto", "triton") and swaps_triton.GLUON)
        return torch.float16 if half else torch.float32
    if name not in _DTYPES:
        raise UserError(f"dtype must be one of auto, {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]
