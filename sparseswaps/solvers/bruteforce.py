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


def enumerable(problem: MaskProblem, limit: int, what: str) -> torch.Tensor:
    """Every feasible keep-mask of the problem's rows [count, d], or a clear error when rows are too wide."""
    if problem.d > limit:
        raise ProblemError(f"{what} takes rows of at most {limit} inputs; this layer has {problem.d}")
    return feasible_masks(problem.d, problem.pattern).to(problem.device)


@register("bruteforce")
class BruteForceSolver(Solver):
    exact = True
    gives_bound = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0) -> Solution:
        candidates = enumerable(problem, MAX_D, "bruteforce enumerates every mask (use 'scip' or 'highs' for "
                                "wider rows) and")
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


REFIT_MAX_D = 16


def refit_errors(w: torch.Tensor, gram: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every candidate keep-mask of one row: the least-squares error min_v (w - v)ᵀ G (w - v) over v zero
    outside the mask, and that v [count, d]; float64, least squares (exact also where G_SS is singular)."""
    count, d = candidates.shape
    kept = candidates.nonzero()[:, 1].view(count, -1)                 # every candidate keeps the same number
    target = gram @ w
    system = gram[kept.unsqueeze(2), kept.unsqueeze(1)]               # [count, k, k]
    solution = torch.linalg.lstsq(system, target[kept].unsqueeze(2), driver="gelsd").solution.squeeze(2)
    weights = torch.zeros(count, d, dtype=torch.float64, device=w.device).scatter_(1, kept, solution)
    residual = w - weights
    return ((residual @ gram) * residual).sum(1), weights


@register("bruteforce_refit")
class BruteForceRefitSolver(Solver):
    """Every feasible mask of every row, each with its least-squares weights: the optimum of masks and weights
    together (its `weight_objective`), the test oracle for that problem on rows of at most 16 inputs. Its
    termination `optimal` refers to that problem; its mask-only objective is not minimal."""

    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0) -> Solution:
        candidates = enumerable(problem, REFIT_MAX_D, "bruteforce_refit re-fits every mask and")
        gram = problem.gram.to(torch.float64)
        masks, weights = [], []
        for w in problem.weight.to(torch.float64):
            errors, refitted = refit_errors(w, gram, candidates)
            best = int(torch.argmin(errors))
            masks.append(candidates[best])
            weights.append(refitted[best])
        return Solution(torch.stack(masks), Termination.OPTIMAL, weight=torch.stack(weights).to(problem.weight.dtype),
                        message="optimal for masks and weights together (weight_objective)")
