"""`admm`: Boža's ADMM weight update with gradual magnitude masking (Boža 2024, "Fast and Effective Weight
Update for Pruned Large Language Models", fmfi-compbio/admm-pruning `lib/admm.py`, `AdmmPruner.fasterprune`).

As the reference does: inputs normalised by sqrt(diag G), G damped by `percdamp` times its mean diagonal,
ρ = 1; for `iters` iterations Z = (W + U) ⊙ M, U += W - Z, W = (G + ρI)⁻¹ (G W₀ + ρ (Z - U)), the mask M
re-chosen by |W + U| during the first `iterative_prune` iterations with the cubic schedule
s_t = s - s (1 - t / iterative_prune)³. The returned weights are the final Z (zero outside the mask).

Per row (the reference's `per_out=True`): each row keeps exactly its share (top-|W + U| per row, where the
reference thresholds and may keep ties). N:M: every group keeps its n largest |W + U| and, during the
schedule, the rest of the layer is thresholded at s_t as in the reference; from the last scheduled
iteration on the mask is exactly N:M. The reference computes in float32 on the GPU; this runs in float64 on
the problem's device. Chain `admm,refit` for the exact least-squares weights on ADMM's mask.
"""
from __future__ import annotations

import torch

from sparseswaps import NM, MaskProblem, PerRow, Solution, Solver, Termination, mask_from_scores, register
from sparseswaps.registry import SolverError


def _scheduled_mask(scores: torch.Tensor, pattern, share: float) -> torch.Tensor:
    """Keep mask at pruned share `share` (≤ the pattern's), from magnitudes `scores` [rows, d]."""
    rows, d = scores.shape
    if isinstance(pattern, PerRow):
        return mask_from_scores(scores, PerRow(max(pattern.keep, d - int(d * share + 1e-9))))
    protected = mask_from_scores(scores, pattern)                 # the n largest of every group
    rest = torch.where(protected, torch.inf, scores).flatten()
    pruned = int(rest.numel() * share + 1e-9)
    if pruned == 0:
        return torch.ones_like(protected)
    threshold = rest.kthvalue(pruned).values
    return (rest > threshold).view(rows, d) | protected


def admm(weight: torch.Tensor, gram: torch.Tensor, pattern, *, iters: int = 20, iterative_prune: int = 15,
         percdamp: float = 0.1, rho: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask, weights zero outside it) for one layer; weight [rows, d], gram [d, d]."""
    gram = gram.to(torch.float64)
    norm = gram.diagonal().clamp_min(0).sqrt() + 1e-8
    xx = gram / norm / norm[:, None]
    w = weight.to(torch.float64) * norm                          # [rows, d]: the reference's Wᵀ
    diagonal = torch.arange(len(xx), device=xx.device)
    xx[diagonal, diagonal] += percdamp * xx.diagonal().mean()
    target = w @ xx                                              # (XX W)ᵀ: XX is symmetric
    xx[diagonal, diagonal] += rho
    inverse = torch.linalg.inv(xx)
    sparsity = 1 - pattern.n / pattern.m if isinstance(pattern, NM) else 1 - pattern.keep / w.shape[1]
    mask = _scheduled_mask(w.abs(), pattern, sparsity)
    u = torch.zeros_like(w)
    for iteration in range(iters):
        if iteration < iterative_prune:
            share = sparsity - sparsity * (1 - (iteration + 1) / iterative_prune) ** 3
            mask = _scheduled_mask((w + u).abs(), pattern, share)
        z = (w + u) * mask
        u = u + (w - z)
        w = (target + rho * (z - u)) @ inverse
    z = (w + u) * mask               # the schedule's last mask (iteration iterative_prune - 1) has the full share
    return mask, z / norm


@register("admm")
class AdmmSolver(Solver):
    """ADMM weight update with gradual magnitude masking (mask and weights)."""

    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, iters: int = 20,
              iterative_prune: int = 15, percdamp: float = 0.1, rho: float = 1.0) -> Solution:
        if not (isinstance(iters, int) and isinstance(iterative_prune, int) and 0 <= iterative_prune <= iters):
            raise SolverError(f"admm needs whole numbers 0 <= iterative_prune <= iters, got {iterative_prune!r} "
                              f"and {iters!r}")
        if not (percdamp >= 0 and rho > 0):
            raise SolverError(f"admm needs percdamp >= 0 and rho > 0, got {percdamp!r} and {rho!r}")
        mask, weight = admm(problem.weight, problem.gram, problem.pattern, iters=iters,
                            iterative_prune=iterative_prune, percdamp=percdamp, rho=rho)
        return Solution(mask, Termination.HEURISTIC, weight=weight.to(problem.weight.dtype) * mask,
                        extra={"iters": iters, "iterative_prune": iterative_prune})
