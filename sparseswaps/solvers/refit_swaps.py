"""`refit_swaps`: 1-swaps scored on the re-fitted objective (masks and weights together).

SparseSwaps scores a swap by the error of w ⊙ m. Here a row's error is the least-squares error of its kept
set S, E(S) = wᵀGw - g_Sᵀ v with g = G w and v = H g_S, H = (G_SS)⁻¹, and a swap (drop i ∈ S, add j ∉ S)
is scored exactly by the two rank-one formulas
    dropping i:          E rises by v_i² / H_ii,
    then adding j:       E falls by (r_j + U_ij v_i / H_ii)² / (G_jj - q_j + U_ij² / H_ii),
with r = g_N - G_NS v (what j would still explain), U = H G_SN and q_j = G_jS H G_Sj. Every iteration each
row takes its best swap while it lowers E by more than a relative 1e-12; the result carries the
least-squares weights of the final mask.

`refit_swap_row` is that, row by row, re-solving the kept system at every swap (O(k² (d - k)) per scan):
the reference. The solver runs `refit_swap_rows`: batches of rows in float64 on the problem's device, the
state kept in the full d x d index space and updated in place after each swap by the bordered-inverse
formulas, so a scan and an update cost O(d²) per row (64 d² bytes of memory per row of a batch budgeted).
On CUDA the scan is one fused Triton kernel (refit_triton.py). It takes the reference's swaps
(tests/test_refit.py). An 8B-wide layer still needs 13 GB per row.
"""
from __future__ import annotations

import torch

from sparseswaps import NM, MaskProblem, Solution, Solver, Termination, mask_from_scores, register
from sparseswaps.registry import SolverError

from . import refit_triton
from .refit import refit_weights, with_diagonal_damping

_RELATIVE_GAIN = 1e-12
ENGINES = ("auto", "torch", "triton")


def _kept_system(gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """H = (G_SS)⁻¹ by least squares, so a singular kept block (a dead input) still gives a minimiser."""
    system = gram[kept][:, kept]
    return torch.linalg.pinv(system, hermitian=True)


def swap_gains(w, gram, keep, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(Δ [k, p] for dropping kept[a] and adding pruned[b], kept, pruned, current error E) of one row."""
    g = gram @ w
    kept, pruned = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    h = _kept_system(gram, kept)
    v = h @ g[kept]
    error = float(w @ g - g[kept] @ v)
    cross = gram[kept][:, pruned]                                   # G_SN
    u = h @ cross                                                   # [k, p]
    q = (cross * u).sum(0)                                          # G_jS H G_Sj
    r = g[pruned] - cross.T @ v
    diagonal = h.diagonal().clamp_min(torch.finfo(h.dtype).tiny)
    numerator = r[None, :] + u * (v / diagonal)[:, None]
    denominator = (gram[pruned, pruned] - q)[None, :] + u * u / diagonal[:, None]
    scale = gram.diagonal().max().clamp_min(torch.finfo(h.dtype).tiny)
    gain = torch.where(denominator > 1e-12 * scale, numerator * numerator / denominator.clamp_min(1e-300), 0.0)
    delta = (v * v / diagonal)[:, None] - gain
    if group is not None:
        delta = torch.where(kept[:, None] // group == pruned[None, :] // group, delta, torch.inf)
    return delta, kept, pruned, error


def refit_swap_row(w, gram, keep, max_iters: int, group: int | None = None) -> tuple[torch.Tensor, int, bool]:
    """(mask, swaps applied, whether a local optimum was reached) of one row, float64."""
    keep = keep.clone()
    for swaps in range(max_iters):
        delta, kept, pruned, error = swap_gains(w, gram, keep, group)
        floor = _RELATIVE_GAIN * max(error, _RELATIVE_GAIN * float(w @ gram @ w))
        if not delta.min() < -floor:
            return keep, swaps, True
        a, b = divmod(int(delta.argmin()), len(pruned))
        keep[kept[a]], keep[pruned[b]] = False, True
    return keep, max_iters, False


class _Batch:
    """The re-fitted state of a batch of rows [B] in the full index space (d x d per row), updated by rank-one
    steps after each swap instead of re-solved: H = (G_SS + λI)⁻¹ on S x S, v = H g_S, U = H G_SN on
    S x N, r_l = g_l - G_lS v and C_l = G_ll + λ - G_lS H G_Sl on N (other entries zero or unused), and E.
    A drop of i (H_ii, h = H[:, i]) and an add of j (u = U[:, j], c = C_j, t_l = G_jl - uᵀ G_:l) follow the
    bordered-inverse formulas: O(d²) per row and swap, where re-solving costs O(d³)."""

    def __init__(self, w, gram, damped, keep, fused: bool = False):
        self.fused = fused
        self.rows, self.keep = torch.arange(len(w), device=w.device), keep.clone()
        self.gram, self.damped = gram, damped
        both = keep[:, :, None] & keep[:, None, :]
        eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        self.h = torch.cholesky_inverse(torch.linalg.cholesky(torch.where(both, damped, eye))) * both
        g = w @ gram
        self.v = (self.h @ g.unsqueeze(2)).squeeze(2)
        self.u = self.h @ gram
        self.r = g - self.v @ gram
        self.c = damped.diagonal() - torch.einsum("sl,bsl->bl", gram, self.u)
        self.error = (w * g).sum(1) - (g * self.v).sum(1)
        self.ids = self.rows.clone()

    def best_swaps(self, group: int | None, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(best Δ, i, j) per row over every swap (kept i, pruned j, one N:M group); ties go to the smallest
        i, then the smallest j. Only the kept x pruned block of U is read: the scan is memory-bound. `fused`:
        one Triton kernel computes the same on CUDA (refit_triton.py)."""
        if self.fused:
            return refit_triton.best_swaps(self.u, self.h, self.v, self.r, self.c, self.keep, group, 1e-12 * scale)
        batch, d = self.keep.shape
        kept = self.keep.nonzero()[:, 1].view(batch, -1)                 # ascending in each row
        pruned = (~self.keep).nonzero()[:, 1].view(batch, -1)
        diagonal = self.h.diagonal(dim1=1, dim2=2).gather(1, kept).clamp_min(torch.finfo(self.h.dtype).tiny)
        v = self.v.gather(1, kept)
        ratio = v / diagonal
        u = self.u[self.rows[:, None, None], kept[:, :, None], pruned[:, None, :]]          # [B, k, p]
        numerator = self.r.gather(1, pruned)[:, None, :] + u * ratio[:, :, None]
        denominator = self.c.gather(1, pruned)[:, None, :] + u * u / diagonal[:, :, None]
        gain = torch.where(denominator > 1e-12 * scale, numerator * numerator / denominator.clamp_min(1e-300), 0.0)
        delta = (v * ratio)[:, :, None] - gain
        if group is not None:
            delta = torch.where(kept[:, :, None] // group == pruned[:, None, :] // group, delta, torch.inf)
        flat = delta.flatten(1)
        at = flat.argmin(1, keepdim=True)                                 # first minimum
        width = pruned.shape[1]
        return flat.gather(1, at).squeeze(1), kept.gather(1, at // width).squeeze(1), pruned.gather(1, at % width).squeeze(1)

    def select(self, going_on: torch.Tensor) -> None:
        for name in ("keep", "h", "v", "u", "r", "c", "error", "ids"):
            setattr(self, name, getattr(self, name)[going_on])
        self.rows = torch.arange(len(self.ids), device=self.ids.device)

    def swap(self, i: torch.Tensor, j: torch.Tensor, delta: torch.Tensor) -> None:
        """Drop i and add j in every row of the batch."""
        self._drop(i)
        self._add(j)
        self.error += delta

    def _drop(self, i):
        rows = self.rows
        h_i = self.h[rows, :, i]                           # [B, d]
        h_ii = h_i[rows, i][:, None]
        v_i, u_i = self.v[rows, i][:, None], self.u[rows, i, :]
        self.h.baddbmm_(h_i[:, :, None], (h_i / h_ii)[:, None, :], alpha=-1)     # in place: no [B, d, d] temporary
        self.v -= h_i * (v_i / h_ii)
        self.u.baddbmm_(h_i[:, :, None], (u_i / h_ii)[:, None, :], alpha=-1)
        self.c += u_i * u_i / h_ii
        self.r += u_i * (v_i / h_ii)
        self.keep[rows, i] = False
        h_i[rows, i] = 0
        self.u[rows, :, i] = -h_i / h_ii
        self.c[rows, i], self.r[rows, i] = 1 / h_ii[:, 0], v_i[:, 0] / h_ii[:, 0]

    def _add(self, j):
        rows = self.rows
        u_j = self.u[rows, :, j]                           # [B, d], zero outside S
        c_j, r_j = self.c[rows, j][:, None], self.r[rows, j][:, None]
        t = self.damped[j] - u_j @ self.gram               # [B, d]
        self.h.baddbmm_(u_j[:, :, None], (u_j / c_j)[:, None, :])
        self.h[rows, :, j] = -u_j / c_j
        self.h[rows, j, :] = -u_j / c_j
        self.h[rows, j, j] = 1 / c_j[:, 0]
        self.v -= u_j * (r_j / c_j)
        self.v[rows, j] = r_j[:, 0] / c_j[:, 0]
        self.u.baddbmm_(u_j[:, :, None], (t / c_j)[:, None, :], alpha=-1)
        self.u[rows, j, :] = t / c_j
        self.c -= t * t / c_j
        self.r -= t * (r_j / c_j)
        self.keep[rows, j] = True


_BYTES_PER_ENTRY = 8 * 8       # float64: H, U and the scan's temporaries, per (row, i, j)


def refit_swap_rows(weight, gram, keep, max_iters: int, group: int | None = None, damping: float = 0.0,
                    batch_rows: int | None = None, engine: str = "auto",
                    diagonal_damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, swaps per row, whether each row reached a local optimum): best 1-swaps on the re-fitted error
    for every row, batched, float64, on the inputs' device. λ = damping · mean(diag G) is added to the kept
    block (0: the exact least-squares error; it must then be positive definite), and the error is measured
    in G + diagonal_damping · diag(G) (refit.py). `engine`: the scan's implementation, "triton" (fused, CUDA
    only), "torch" or "auto" (Triton where it can run)."""
    fused = _fused_scan(engine, weight.device)
    gram = with_diagonal_damping(gram.to(torch.float64), diagonal_damping)
    damped = gram + damping * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    scale = float(gram.diagonal().max().clamp_min(torch.finfo(gram.dtype).tiny))
    weight, mask = weight.to(torch.float64), keep.clone()
    swaps = torch.zeros(len(weight), dtype=torch.long, device=weight.device)
    converged = torch.zeros(len(weight), dtype=torch.bool, device=weight.device)
    batch_rows = batch_rows or _batch_rows(len(gram), weight.device)
    start = 0
    while start < len(weight):
        rows = slice(start, start + batch_rows)
        try:
            _refine(_Batch(weight[rows], gram, damped, keep[rows], fused), weight[rows], gram, group, scale, max_iters,
                    mask[rows], swaps[rows], converged[rows])
        except torch.cuda.OutOfMemoryError:
            if batch_rows == 1:
                raise
            batch_rows = max(1, batch_rows // 2)       # the batch starts again from its warm start
            mask[rows], swaps[rows], converged[rows] = keep[rows], 0, False
            torch.cuda.empty_cache()
            continue
        start = rows.stop
    if weight.is_cuda:
        torch.cuda.empty_cache()       # the batch state can reach 16 GiB: give it back to other work
    return mask, swaps, converged


def _refine(batch, weight, gram, group, scale, max_iters, mask, swaps, converged) -> None:
    """Best improving swap of every row of the batch until none improves by more than a relative 1e-12."""
    energy = (weight * (weight @ gram)).sum(1)
    for _ in range(max_iters):
        best, i, j = batch.best_swaps(group, scale)
        floor = _RELATIVE_GAIN * torch.maximum(batch.error, _RELATIVE_GAIN * energy[batch.ids])
        improving = best < -floor
        converged[batch.ids[~improving]] = True
        mask[batch.ids[~improving]] = batch.keep[~improving]
        if not bool(improving.any()):
            return
        if not bool(improving.all()):
            batch.select(improving)
            best, i, j = best[improving], i[improving], j[improving]
        batch.swap(i, j, best)
        swaps[batch.ids] += 1
    mask[batch.ids] = batch.keep


def _fused_scan(engine: str, device: torch.device) -> bool:
    """Whether the scan runs as the fused Triton kernel."""
    if engine not in ENGINES:
        raise SolverError(f"refit_swaps engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    can = device.type == "cuda" and refit_triton.AVAILABLE
    if engine == "triton" and not can:
        raise SolverError("refit_swaps engine 'triton' runs on CUDA devices and needs triton installed")
    return can and engine != "torch"


def _batch_rows(d: int, device: torch.device) -> int:
    """Rows whose state fits half the free GPU memory, at most 16 GiB (a scan streams the whole state, so
    larger batches gain little and would crowd out other processes), or 256 MiB on the CPU."""
    budget = min(torch.cuda.mem_get_info(device)[0] // 2, 16 << 30) if device.type == "cuda" else 256 << 20
    return max(1, budget // (_BYTES_PER_ENTRY * d * d))


@register("refit_swaps")
class RefitSwapsSolver(Solver):
    """Best 1-swaps on the re-fitted error from a warm start (default: Wanda's mask), all rows at once on the
    problem's device; returns the mask and its least-squares weights."""

    warm_start = True
    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, max_iters: int = 1000,
              damping: float = 0.0, batch_rows: int | None = None, engine: str = "auto",
              diagonal_damping: float = 0.0) -> Solution:
        if not isinstance(max_iters, int) or max_iters < 0:
            raise SolverError(f"refit_swaps needs a whole number max_iters >= 0, got {max_iters!r}")
        if not (damping >= 0 and diagonal_damping >= 0):
            raise SolverError(f"refit_swaps needs damping >= 0 and diagonal_damping >= 0, got {damping!r} and "
                              f"{diagonal_damping!r}")
        start = warm_start if warm_start is not None else mask_from_scores(problem.wanda_scores(), problem.pattern)
        group = problem.pattern.m if isinstance(problem.pattern, NM) else None
        try:
            mask, swaps, converged = refit_swap_rows(problem.weight, problem.gram, start.to(problem.device),
                                                     max_iters, group, damping, batch_rows, engine,
                                                     diagonal_damping)
        except torch.linalg.LinAlgError as error:
            raise SolverError(f"refit_swaps: the kept block of G is singular for some row ({error}); set damping "
                              "> 0 (λ = damping · mean diag G is added to it), e.g. damping=1e-6") from error
        rows_converged = int(converged.sum())
        termination = Termination.LOCAL_OPTIMUM if rows_converged == problem.rows else Termination.ITERATION_LIMIT
        weight = refit_weights(problem, mask, damping=damping, diagonal_damping=diagonal_damping)
        return Solution(mask, termination, weight=weight,
                        extra={"swaps": swaps.cpu(), "swaps_total": int(swaps.sum()), "converged": converged.cpu(),
                               "rows_converged": rows_converged},
                        message=f"{rows_converged} of {problem.rows} rows at a local optimum of the re-fitted error")
