"""`refit_swaps`: 1-swaps scored on the re-fitted objective (masks and weights together).

SparseSwaps scores a swap by the error of w ⊙ m. Here a row's error is the least-squares error of its kept
set S, E(S) = wᵀGw - g_Sᵀ v with g = G w and v = H g_S, H = (G_SS)⁻¹, and a swap (drop i ∈ S, add j ∉ S)
is scored exactly by the two rank-one formulas
    dropping i:          E rises by v_i² / H_ii,
    then adding j:       E falls by (r_j + U_ij v_i / H_ii)² / (G_jj - q_j + U_ij² / H_ii),
with r = g_N - G_NS v (what j would still explain), U = H G_SN and q_j = G_jS H G_Sj. Every iteration each
row takes its best swap while it lowers E by more than a relative 1e-12; the result carries the
least-squares weights of the final mask. Float64, row by row, O(k² (d - k)) per scan: meant for small and
medium rows (the gap harness, layer studies), not for 8B-wide layers.
"""
from __future__ import annotations

import torch

from sparseswaps import NM, MaskProblem, Solution, Solver, Termination, mask_from_scores, register
from sparseswaps.registry import SolverError

_RELATIVE_GAIN = 1e-12


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


@register("refit_swaps")
class RefitSwapsSolver(Solver):
    """Best 1-swaps on the re-fitted error from a warm start (default: Wanda's mask); returns the mask and
    its least-squares weights."""

    warm_start = True
    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0,
              max_iters: int = 1000) -> Solution:
        from .refit import refit_weights

        if not isinstance(max_iters, int) or max_iters < 0:
            raise SolverError(f"refit_swaps needs a whole number max_iters >= 0, got {max_iters!r}")
        start = warm_start if warm_start is not None else mask_from_scores(problem.wanda_scores(), problem.pattern)
        gram = problem.gram.to(torch.float64)
        group = problem.pattern.m if isinstance(problem.pattern, NM) else None
        rows, swaps, converged = [], 0, 0
        for w, keep in zip(problem.weight.to(torch.float64), start):
            mask, count, done = refit_swap_row(w, gram, keep, max_iters, group)
            rows.append(mask)
            swaps, converged = swaps + count, converged + done
        mask = torch.stack(rows)
        termination = Termination.LOCAL_OPTIMUM if converged == problem.rows else Termination.ITERATION_LIMIT
        return Solution(mask, termination, weight=refit_weights(problem, mask, damping=0.0),
                        extra={"swaps_total": swaps, "rows_converged": converged},
                        message=f"{converged} of {problem.rows} rows at a local optimum of the re-fitted error")
