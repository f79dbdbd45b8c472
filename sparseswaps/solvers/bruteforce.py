"""Exhaustive enumeration of every feasible mask of every row: the test oracle for tiny rows (d <= 20)."""
import itertools

import torch

from sparseswaps import MaskProblem, PerRow, ProblemError, Solution, Solver, Termination, register

MAX_D = 20


def feasible_masks(d: int, pattern) -> torch.Tensor:
    """Every feasible keep-mask of one row, as a bool tensor [count, d]."""
    if isinstance(pattern, PerRow):
        kept = torch.tensor(list(itertools.combinations(range(d), pattern.keep)), dtype=torch.long)
        masks = torch.zeros(len(kept), d, dtype=torch.bool)
        return masks.scatter_(1, kept, True)
    group = feasible_masks(pattern.m, PerRow(pattern.n))
    choices = itertools.product(range(len(group)), repeat=d // pattern.m)
    return torch.stack([torch.cat([group[i] for i in choice]) for choice in choices])


@register("bruteforce")
class BruteForceSolver(Solver):
    exact = True
    gives_bound = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0) -> Solution:
        if problem.d > MAX_D:
            raise ProblemError(f"bruteforce enumerates every mask and takes rows of at most {MAX_D} inputs; "
                               f"this layer has {problem.d}: use 'scip' or 'highs' for exact solutions")
        candidates = feasible_masks(problem.d, problem.pattern).to(problem.device)
        pruned = (~candidates).to(torch.float64)
        gram = problem.gram.to(torch.float64)
        best_masks, best_values = [], []
        for w in problem.weight.to(torch.float64):
            q = w[:, None] * gram * w[None, :]
            values = ((pruned @ q) * pruned).sum(1)
            best = int(torch.argmin(values))      # first minimiser: deterministic
            best_masks.append(candidates[best])
            best_values.append(values[best])
        # The optimum is its own lower bound.
        return Solution(torch.stack(best_masks), Termination.OPTIMAL, row_bound=torch.stack(best_values))
