"""RIA, relative importance and activations (Zhang et al., ICLR 2024).

score_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||^alpha, alpha = 0.5, compared within
each output row (the per-row problem) or N:M group. RIA's channel permutation for N:M is not included.
"""
import torch

from sparseswaps import MaskProblem, Solution, Solver, Termination, mask_from_scores, register


def ria_scores(weight: torch.Tensor, gram: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    magnitude = weight.abs()
    # A column or row of zeros has relative importance 0, not NaN.
    column_share = magnitude / magnitude.sum(0, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    row_share = magnitude / magnitude.sum(1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
    input_norm = gram.diagonal().clamp_min(0).sqrt()
    return (column_share + row_share) * input_norm.pow(alpha)


@register("ria")
class RiaSolver(Solver):
    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0,
              alpha: float = 0.5) -> Solution:
        scores = ria_scores(problem.weight, problem.gram, alpha)
        return Solution(mask_from_scores(scores, problem.pattern), Termination.HEURISTIC)
