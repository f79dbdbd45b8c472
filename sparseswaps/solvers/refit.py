"""`refit`: the kept weights of every row re-fitted by exact least squares on a fixed mask.

Per row, min over v with v = 0 outside the mask of (w - v)ᵀ G (w - v): v_K = (G_KK + λI)⁻¹ (G w)_K. With
`diagonal_damping` δ the metric is G + δ diag(G), ADMM's: the kept weights are pulled toward their dense
values and each pruned weight costs δ G_ii w_i² more. Chain it
after any mask solver (`wanda,refit`, `wanda,swaps,refit`); the result carries the weights in
`SolveResult.weight` and their error in `weight_objective`. `--update-weights` in the pipeline appends it.
"""
from __future__ import annotations

import torch

from sparseswaps.errors import UserError
from sparseswaps.problem import MaskProblem
from sparseswaps.registry import Solver, SolverError, register
from sparseswaps.result import Solution, Termination


def refit_weights(problem: MaskProblem, mask: torch.Tensor, damping: float = 1e-6,
                  tolerance: float = 1e-10, diagonal_damping: float = 0.0) -> torch.Tensor:
    """Kept weights of each row re-fitted by least squares, w'_K = (G_KK + λI)⁻¹ (G w)_K and w'_¬K = 0, with
    λ = damping · mean(diag G), G taken as G + diagonal_damping · diag(G).

    All rows at once by conjugate gradients on masked Gram products, Jacobi-preconditioned, in float64: one
    [rows, d] x [d, d] product per iteration and O(rows · d) memory (a dense kept-by-kept system per row
    needs rows · k² · 8 bytes, 26 GB per 64 rows of an 8B-shaped down_proj). A row is done once its residual
    is below `tolerance` times its right-hand side; rows still short of it after 2k + 10 iterations (an
    ill-conditioned kept block) are solved exactly by dense solves, so no row returns an approximation.
    """
    gram = with_diagonal_damping(problem.gram.to(torch.float64), diagonal_damping)
    diagonal = gram.diagonal() + damping * gram.diagonal().mean()
    weight, keep = problem.weight.to(torch.float64), mask.to(torch.float64)

    def normal_product(v):
        return (v @ gram + (diagonal - gram.diagonal()) * v) * keep

    precondition = keep * torch.where(diagonal > 0, 1 / diagonal, 0)
    rhs = (weight @ gram) * keep
    solution = weight * keep
    residual = rhs - normal_product(solution)
    direction = residual * precondition
    rz = (residual * direction).sum(1)
    limit = tolerance * rhs.norm(dim=1)
    for _ in range(2 * problem.keep + 10):
        active = residual.norm(dim=1) > limit
        if not bool(active.any()):
            break
        product = normal_product(direction)
        step = torch.where(active, rz / (direction * product).sum(1), 0)
        solution += step[:, None] * direction
        residual -= step[:, None] * product
        preconditioned = residual * precondition
        rz_next = (residual * preconditioned).sum(1)
        direction = preconditioned + torch.where(active, rz_next / rz, 0)[:, None] * direction
        rz = rz_next
    unsolved = (residual.norm(dim=1) > limit).nonzero().flatten()
    if len(unsolved):
        solution[unsolved] = _dense_least_squares(problem, mask, unsolved, gram + torch.diag(diagonal - gram.diagonal()),
                                                  rhs)
    return solution.to(problem.weight.dtype)


def with_diagonal_damping(gram: torch.Tensor, diagonal_damping: float) -> torch.Tensor:
    """G + δ diag(G) (G itself for δ = 0)."""
    return gram + torch.diag(diagonal_damping * gram.diagonal()) if diagonal_damping else gram


def _dense_least_squares(problem, mask, rows, system_matrix, rhs, budget_bytes: int = 1 << 30) -> torch.Tensor:
    """Exact solves of the kept-by-kept systems of `rows`, in batches whose systems fit `budget_bytes`. A kept
    dead input (zero row and column) keeps its weight, as conjugate gradients leave it."""
    kept = problem.keep
    solution = torch.zeros(len(rows), problem.d, dtype=torch.float64, device=rhs.device)
    batch = max(1, budget_bytes // (2 * kept * kept * 8))
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        index = mask[chunk].nonzero()[:, 1].view(len(chunk), kept)   # the kept entries, ascending
        system = system_matrix[index.unsqueeze(2), index.unsqueeze(1)]
        dead = system.diagonal(dim1=1, dim2=2) == 0
        system.diagonal(dim1=1, dim2=2).masked_fill_(dead, 1.0)
        target = torch.where(dead, torch.gather(problem.weight[chunk].to(rhs.dtype), 1, index),
                             torch.gather(rhs[chunk], 1, index))
        factor, info = torch.linalg.cholesky_ex(system)
        if bool((info > 0).any()):
            raise UserError(f"{problem.name or 'a layer'}: the kept block of G is not positive definite for some rows "
                            "(a repeated input among the kept ones), so their least-squares weights are not unique: "
                            "raise the damping (λ = damping · mean diag G)")
        values = torch.cholesky_solve(target.unsqueeze(2), factor).squeeze(2)
        solution[start:start + len(chunk)].scatter_(1, index, values)
    return solution


@register("refit")
class RefitSolver(Solver):
    """Least-squares weights on the warm start's mask (batched Jacobi-PCG in float64; exact dense solves for
    rows the iteration leaves short of the tolerance)."""

    warm_start = True
    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, damping: float = 1e-6,
              tolerance: float = 1e-10, diagonal_damping: float = 0.0) -> Solution:
        if warm_start is None:
            raise SolverError("refit re-fits the weights on a given mask: chain it after a mask solver, e.g. "
                              "wanda,refit or wanda,swaps,refit")
        if not (damping >= 0 and tolerance >= 0 and diagonal_damping >= 0):
            raise SolverError(f"refit needs damping, tolerance and diagonal_damping >= 0, got {damping!r}, "
                              f"{tolerance!r} and {diagonal_damping!r}")
        weight = refit_weights(problem, warm_start, damping=damping, tolerance=tolerance,
                               diagonal_damping=diagonal_damping)
        return Solution(warm_start, Termination.HEURISTIC, weight=weight,
                        extra={"damping": damping, "tolerance": tolerance, "diagonal_damping": diagonal_damping})
