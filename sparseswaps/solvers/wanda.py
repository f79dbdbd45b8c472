"""Wanda (Sun et al., 2024): keep the largest |w_j| * ||X_j|| of every output row (or N:M group).

||X_j|| = sqrt(G_jj); ties are broken as Wanda's stable sort breaks them (lower index pruned first).
"""
from sparseswaps import MaskProblem, Solution, Solver, Termination, mask_from_scores, register


@register("wanda")
class WandaSolver(Solver):
    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0) -> Solution:
        return Solution(mask_from_scores(problem.wanda_scores(), problem.pattern), Termination.HEURISTIC)
