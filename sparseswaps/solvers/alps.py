"""`alps`: ALPS (Meng et al., NeurIPS 2024, mazumder-lab/ALPS `alps.py`, `ALPS_prune.ALPS_admm`).

As the reference does: G damped by 1% of its mean diagonal, inputs normalised by sqrt(diag G); ADMM on
B (the layer's transposed weights) with D the projection of (V + ρB)/ρ onto the pattern by magnitude and V
the scaled dual; every `update_iter` iterations ρ grows with the support's change (×1.3 above 10% of the
kept count, ×1.2 above 0.5%, ×1.1 for any change once grown; a still support before ρ ever grew divides ρ
by 5, restarting the iterates when some entries still move), capped at 1e6, and the loop stops when the
support no longer changes after ρ grew, or after `switch_iter` iterations once under 0.03% changes. The
mask is the projection of the last B.

Differences from the reference: (1) for per-row sparsity the projection keeps each row's share (the
reference's unstructured mode keeps the layer's largest entries, rows unequal), so the mask fits the
toolkit's per-row problem; N:M is the reference's. (2) The weights on the mask are exact least squares
(`refit`, undamped G), where the reference runs 10 conjugate-gradient steps on its damped G. (3) Float64 on
the problem's device, where the reference iterates in float32 on a GPU. tests/test_refit.py runs a port of
the reference beside this.
"""
from __future__ import annotations

import torch

from sparseswaps import MaskProblem, Solution, Solver, Termination, mask_from_scores, register
from sparseswaps.registry import SolverError

from .refit import refit_weights


def _project(b: torch.Tensor, pattern) -> torch.Tensor:
    """Keep mask [rows, d] of the largest |entries| of bᵀ under the pattern (b is [d, rows])."""
    return mask_from_scores(b.T.abs(), pattern)


def _inverse(eigenvalues, eigenvectors, rho: float) -> torch.Tensor:
    return eigenvectors @ (eigenvectors / (eigenvalues + rho)).T


def alps_mask(weight: torch.Tensor, gram: torch.Tensor, pattern, *, rho: float = 0.1, max_iter: int = 300,
              update_iter: int = 3, switch_iter: int = 30) -> tuple[torch.Tensor, int]:
    """(keep mask, iterations run) of ALPS's ADMM for one layer; weight [rows, d], gram [d, d]."""
    xtx = gram.to(torch.float64).clone()
    diagonal = torch.arange(len(xtx), device=xtx.device)
    xtx[diagonal, diagonal] += 0.01 * xtx.diagonal().mean()
    norm = xtx.diagonal().sqrt() + 1e-8
    xtx = xtx / norm / norm[:, None]
    b_orig = (weight.to(torch.float64) * norm).T.contiguous()              # [d, rows]
    ytx = xtx @ b_orig                                                      # the reference's YtXᵀ
    eigenvalues, eigenvectors = torch.linalg.eigh(xtx)
    inverse = _inverse(eigenvalues, eigenvectors, rho)
    keep = _project(b_orig, pattern)
    kept = int(keep.sum())
    d_init = b_orig * keep.T
    b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b_orig)
    support_before, grown, iteration = keep, False, 0
    for iteration in range(max_iter):
        b = inverse @ (ytx - v + rho * d)
        proposal = (v + rho * b) / rho
        keep = _project(proposal, pattern)
        d = proposal * keep.T
        v = v + rho * (b - d)
        if (iteration + 1) % update_iter:
            continue
        change = int((keep != support_before).sum())
        if change / kept > 0.1:
            grown, rho = True, rho * 1.3
        elif change / kept > 0.005:
            grown, rho = True, rho * 1.2
        elif change > 0.5:
            if grown:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b_orig)
        elif grown:
            break
        else:
            rho /= 5
        support_before = keep
        rho = min(rho, 1e6)
        inverse = _inverse(eigenvalues, eigenvectors, rho)
        if iteration >= switch_iter and change / kept < 0.0003:
            break
    return _project(b, pattern), iteration + 1


@register("alps")
class AlpsSolver(Solver):
    """ALPS: ADMM with a support-driven penalty schedule, then exact least squares on its mask."""

    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, rho: float = 0.1,
              max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30) -> Solution:
        if not (rho > 0 and isinstance(max_iter, int) and max_iter >= 1 and isinstance(update_iter, int)
                and update_iter >= 1 and isinstance(switch_iter, int) and switch_iter >= 0):
            raise SolverError(f"alps needs rho > 0 and whole numbers max_iter >= 1, update_iter >= 1, "
                              f"switch_iter >= 0; got {rho!r}, {max_iter!r}, {update_iter!r}, {switch_iter!r}")
        mask, iterations = alps_mask(problem.weight, problem.gram, problem.pattern, rho=rho, max_iter=max_iter,
                                     update_iter=update_iter, switch_iter=switch_iter)
        weight = refit_weights(problem, mask).to(problem.weight.dtype)
        return Solution(mask, Termination.HEURISTIC, weight=weight, extra={"admm_iterations": iterations})
