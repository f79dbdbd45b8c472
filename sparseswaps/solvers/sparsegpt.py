"""SparseGPT (Frantar & Alistarh, 2023): OBS mask selection with sequential weight updates.

Columns are processed in blocks of 128 with dampening 0.01 * mean(diag G), as in the paper. Inside a block
the mask is chosen by w² / [H⁻¹]_jj² on the weights already updated by earlier columns.
- `row_equal=True` (default): every row prunes the same number of weights in every block (the per-row
  target spread evenly over blocks), so the mask is feasible for the per-row problem as it stands.
- `row_equal=False`: the paper's layer-wide threshold per block; the mask is then repaired with
  `problem.project` (extra["projected_flips"] counts the flips).
- N:M uses SparseGPT's native selection (the m - n smallest of every group of m).
The solver returns the mask and the updated weights (`SolveResult.weight`; the registry recomputes their
error (w - ŵ)ᵀ G (w - ŵ) in `weight_objective`, per row in `row_weight_objective`); both are
reported beside it, since with the updates SparseGPT's error is far below the mask-only objective.
"""
from __future__ import annotations

import torch

from sparseswaps import NM, MaskProblem, PerRow, Solution, Solver, Termination, register
from sparseswaps.registry import SolverError


def _inverse_hessian_factor(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (G + damp I)⁻¹ and the mask of dead inputs (G_jj = 0)."""
    h = gram.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    h.diagonal().add_(damping * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True), dead


def _prune_in_block(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune mask (True = prune) of the `count` lowest scores of every row."""
    prune = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        prune.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :count], True)
    return prune


def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, pattern, *, blocksize: int = 128, damping: float = 0.01,
              row_equal: bool = True, sparsity: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (prune mask, True = pruned; updated weights). float32, like the reference implementation."""
    w = weight.to(torch.float32).clone()
    rows, d = w.shape
    hinv, dead = _inverse_hessian_factor(gram.to(torch.float32), damping)
    w[:, dead] = 0
    prune = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    total_prune = d - pattern.keep if isinstance(pattern, PerRow) else None
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        scores = w1 ** 2 / hinv1.diagonal().unsqueeze(0) ** 2
        if isinstance(pattern, PerRow) and row_equal:
            block_prune = _prune_in_block(scores, total_prune * i2 // d - total_prune * i1 // d)
        elif isinstance(pattern, PerRow):
            threshold = torch.sort(scores.flatten())[0][int(scores.numel() * sparsity)]
            block_prune = scores <= threshold
        else:
            block_prune = torch.zeros_like(w1, dtype=torch.bool)
        errors = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if isinstance(pattern, NM) and i % pattern.m == 0:
                group = w1[:, i:i + pattern.m] ** 2 / hinv1.diagonal()[i:i + pattern.m].unsqueeze(0) ** 2
                block_prune[:, i:i + pattern.m] = _prune_in_block(group, pattern.m - pattern.n)
            column = w1[:, i]
            quantised = torch.where(block_prune[:, i], torch.zeros_like(column), column)
            error = (column - quantised) / hinv1[i, i]
            w1[:, i:] -= error.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = quantised
            errors[:, i] = error
        w[:, i1:i2] = w1
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
        prune[:, i1:i2] = block_prune
    return prune, w


@register("sparsegpt")
class SparseGPTSolver(Solver):
    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, blocksize: int = 128,
              damping: float = 0.01, row_equal: bool = True) -> Solution:
        if not row_equal and problem.sparsity is None and isinstance(problem.pattern, PerRow):
            raise SolverError("row_equal=False needs a problem built from a sparsity share")
        prune, updated = sparsegpt(problem.weight, problem.gram, problem.pattern, blocksize=blocksize,
                                   damping=damping, row_equal=row_equal, sparsity=problem.sparsity)
        mask = ~prune
        extra = {}
        if not problem.is_feasible(mask):
            projected = problem.project(mask)
            extra["projected_flips"] = int((projected != mask).sum())
            mask = projected
            updated = torch.where(mask, updated, torch.zeros_like(updated))
        return Solution(mask, Termination.HEURISTIC, extra=extra, weight=updated.to(problem.weight.dtype))
