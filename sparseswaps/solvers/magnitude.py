"""Magnitude pruning: keep the largest |w| of every row (or N:M group)."""
from sparseswaps import MaskProblem, Solution, Solver, Termination, mask_from_scores, register


@register("magnitude")
class MagnitudeSolver(Solver):
    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0) -> Solution:
        return Solution(mask_from_scores(problem.weight.abs(), problem.pattern), Termination.HEURISTIC)
