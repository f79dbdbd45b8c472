"""`scip_refit`: masks and weights together as an exact MIQP through SCIP, row by row.

Per row: min over prune indicators p (binary, the pattern's count per row or N:M group) and kept weights v of
(w - v)ᵀ G (w - v), with v_i = 0 wherever p_i = 1 (best-subset regression). Epigraph form, as `scip`:
    min t   s.t.  r = Fᵀ (w - v) / √scale,  t >= ||r||²,  p_i = 1  =>  v_i = 0,
with F Fᵀ = G and `scale` the incumbent's error E₀, so SCIP works near 1. The link p_i = 1 => v_i = 0 is a
big-M constraint |v_i| <= M_i (1 - p_i) with M_i = |w_i| + sqrt(E₀ [G⁻¹]_ii): every v at least as good as the
incumbent lies in the ellipsoid (w - v)ᵀ G (w - v) <= E₀, whose extent along axis i that is, so the optimum
is never cut off (indicator constraints alone left SCIP's relaxation at 0). G must be positive definite.
The warm start (default: Wanda refined by `refit_swaps`) with its least-squares weights is SCIP's first
incumbent. SCIP's outer approximation of t >= ||r||² closes the last 1e-9 of a gap slowly, so the default
relative gap is 1e-8 (rows end `gap_limit`, proven within it; `gap=0` asks for more). The returned weights
are the exact least squares on SCIP's mask (`refit`, undamped), and
`row_weight_bound` is SCIP's dual bound less its feasibility tolerance, in original units: the bound on the
masks-and-weights optimum (`SolveResult.weight_gap`), not on the mask-only objective.

`perspective=True` strengthens the relaxation (the perspective reformulation of best-subset regression):
with δ >= 0 such that G - diag(δ) stays positive definite (`perspective_shift`), the error
is (w - v)ᵀ (G - diag δ) (w - v) + Σ δ_i (w_i² - 2 w_i v_i) + Σ z_i, with z_i (1 - p_i) >= δ_i v_i²: the
same value on every feasible point (z_i = δ_i v_i² where kept, v_i = 0 where pruned), and a fractional p_i
lets z_i fall only to δ_i v_i² / (1 - p_i) instead of δ_i v_i². Any such δ keeps the formulation exact; a
larger one gives a stronger relaxation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from sparseswaps import MaskProblem, Solution, SolverError, register

from .bruteforce import refit_errors
from .exact import (ExactSolver, RowOutcome, assemble, deadline_of, map_rows, prune_groups, psd_factor,
                    within_budget)
from .scip import add_solution, dual_bound, new_model, row_status

# SCIP's feasibility tolerance: at the mask-only solver's 1e-9, its LP solver fails on some rows (the continuous
# weights with their big-M links); 1e-8 solved every test row. The bound gives this much away.
_FEASTOL = 1e-8


@dataclass
class RefitRowModel:
    """One row of the masks-and-weights problem for SCIP."""

    w: np.ndarray            # row weights, float64
    gram: np.ndarray
    factor: np.ndarray       # F with F Fᵀ = G - diag(shift)
    inverse_diagonal: np.ndarray   # [G⁻¹]_ii
    groups: list
    incumbent: np.ndarray    # prune indicators of the warm start (bool)
    shift: np.ndarray        # δ of the perspective terms (zeros without them)

    def reach(self, error: float) -> np.ndarray:
        """|w_i - v_i| <= sqrt(error · [G⁻¹]_ii) for every v with (w - v)ᵀ G (w - v) <= error: the extent of
        that ellipsoid along each axis. Valid bounds for any solution at least as good as the incumbent."""
        return np.sqrt(error * self.inverse_diagonal)

    def least_squares(self, prune: np.ndarray) -> tuple[np.ndarray, float]:
        """(v, error) of the least-squares weights on the kept entries (`refit_errors`, as brute force)."""
        errors, weights = refit_errors(torch.from_numpy(self.w), torch.from_numpy(self.gram),
                                       torch.from_numpy(~prune)[None])
        return weights[0].numpy(), float(errors[0])


@within_budget
def _solve_row(model: RefitRowModel, time_limit, gap, seed, params) -> RowOutcome:
    from pyscipopt import quicksum

    started = time.perf_counter()
    start_v, start_error = model.least_squares(model.incumbent)
    scale = start_error if start_error > 0 else 1.0
    factor = model.factor / np.sqrt(scale)
    scip = new_model(time_limit, gap, seed, {"numerics/feastol": _FEASTOL, **params})
    d, rank = factor.shape
    p = [scip.addVar(vtype="B", name=f"p{i}") for i in range(d)]
    v = [scip.addVar(lb=None, name=f"v{i}") for i in range(d)]
    r = [scip.addVar(lb=None, name=f"r{k}") for k in range(rank)]
    t = scip.addVar(lb=0, name="t")
    target = factor.T @ model.w
    for k in range(rank):
        scip.addCons(r[k] + quicksum(factor[i, k] * v[i] for i in range(d) if factor[i, k] != 0) == target[k])
    scip.addCons(quicksum(rk * rk for rk in r) <= t)
    reach = model.reach(start_error)
    for i in range(d):      # big-M links with M from the incumbent's error: they cannot cut off the optimum
        scip.chgVarLb(v[i], model.w[i] - reach[i])
        scip.chgVarUb(v[i], model.w[i] + reach[i])
        big = abs(model.w[i]) + reach[i]
        scip.addCons(v[i] <= big * (1 - p[i]))
        scip.addCons(-v[i] <= big * (1 - p[i]))
    for indices, pruned in model.groups:
        scip.addCons(quicksum(p[i] for i in indices) == pruned)
    z, terms = _perspective_terms(scip, model, p, v, scale, reach)
    scip.setObjective(t + quicksum(terms), "minimize")
    scip.addObjoffset(float(model.shift @ (model.w * model.w)) / scale)
    _add_incumbent(scip, (p, v, r, t, z), model, start_v, factor, target, scale)
    scip.optimize()
    best = scip.getBestSol()
    prune = np.array([scip.getSolVal(best, x) > 0.5 for x in p]) if scip.getNSols() else model.incumbent
    bound = dual_bound(scip, scale, _FEASTOL)
    ours, message = row_status(scip.getStatus(), gap)
    return RowOutcome(prune=prune, bound=min(bound, model.least_squares(prune)[1]), status=ours,
                      nodes=int(scip.getNNodes()), seconds=time.perf_counter() - started, message=message)


def _perspective_terms(scip, model: RefitRowModel, p, v, scale: float, reach: np.ndarray) -> tuple[list, list]:
    """(z, the objective's terms z_i - 2 c_i w_i v_i) with z_i (1 - p_i) >= c_i v_i² and c_i = δ_i / scale, one
    per input (none without the perspective terms). z_i is in the objective's units, so that SCIP's
    feasibility tolerance on these constraints moves the objective by that tolerance, not by δ_i / scale
    times it."""
    z, terms = [], []
    if not model.shift.any():
        return z, terms
    for i in range(len(model.w)):
        weight = float(model.shift[i]) / scale
        largest = max(abs(model.w[i] - reach[i]), abs(model.w[i] + reach[i])) ** 2
        z.append(scip.addVar(lb=0, ub=weight * largest, name=f"z{i}"))
        scip.addCons(weight * v[i] * v[i] <= z[-1] - z[-1] * p[i])
        terms.append(z[-1] - 2 * weight * float(model.w[i]) * v[i])
    return z, terms


def _add_incumbent(scip, variables, model: RefitRowModel, v_values, factor, target, scale: float) -> None:
    p, v, r, t, z = variables
    residual = target - factor.T @ v_values
    add_solution(scip, [(p, model.incumbent), (v, v_values), (r, residual), ([t], [residual @ residual]),
                        (z, model.shift / scale * v_values * v_values if z else [])])


def perspective_shift(gram: np.ndarray, passes: int = 3, conditioning: float = 1e-6) -> np.ndarray:
    """δ >= 0 with G - diag(δ) positive definite, grown one input at a time: δ_i may rise by up to
    1 / [(G - diag δ)⁻¹]_ii before G - diag(δ) turns singular (the Schur complement), and takes half of that
    while the smallest eigenvalue stays above `conditioning` times G's largest, or above half of G's own
    smallest where G is already worse conditioned than that (else no input would get any δ). Against the
    mask-only solvers' uniform shift s·diag(G) (exact.diagonal_shift) as δ: benchmarks/README.md §11."""
    shift = np.zeros(len(gram))
    eigenvalues = np.linalg.eigvalsh(gram)
    floor = min(conditioning * eigenvalues[-1], 0.5 * eigenvalues[0])
    for _ in range(passes):
        for i in range(len(gram)):
            trial = shift.copy()
            trial[i] += 0.5 / np.linalg.inv(gram - np.diag(shift))[i, i]
            if np.linalg.eigvalsh(gram - np.diag(trial))[0] > floor:
                shift = trial
    return shift


def row_models(problem: MaskProblem, warm_start: torch.Tensor, perspective: bool = False) -> list[RefitRowModel]:
    gram = problem.gram.detach().cpu().to(torch.float64).numpy()
    shift = perspective_shift(gram) if perspective else np.zeros(len(gram))
    factor = psd_factor(gram - np.diag(shift))
    inverse_diagonal = np.diag(np.linalg.inv(gram)).clip(min=0)      # G is positive definite (checked)
    groups = prune_groups(problem.d, problem.pattern)
    prune = (~warm_start).cpu().numpy()
    return [RefitRowModel(w=w, gram=gram, factor=factor, inverse_diagonal=inverse_diagonal, groups=groups,
                          incumbent=p, shift=shift)
            for w, p in zip(problem.weight.detach().cpu().to(torch.float64).numpy(), prune)]


@register("scip_refit")
class ScipRefitSolver(ExactSolver):
    """Masks and weights together, exact through SCIP: the optimum of weight_objective (with a bound on it),
    for small rows. Its mask-only objective is not minimal."""

    package = "pyscipopt"
    exact = False            # exact for masks and weights together; the mask-only objective is not minimised
    gives_bound = False      # the bound is on weight_objective (row_weight_bound), not on the mask objective
    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, gap: float = 1e-8,
              workers: int = 1, row_time_limit: float | None = None, scip_params: dict | None = None,
              executor: str = "process", perspective: bool = False) -> Solution:
        from sparseswaps import solve
        from .refit import refit_weights

        if not isinstance(perspective, bool):
            raise SolverError(f"scip_refit's perspective is true or false, got {perspective!r}")
        if int(torch.linalg.cholesky_ex(problem.gram.to(torch.float64)).info) != 0:
            raise SolverError("scip_refit bounds the weights by G's inverse, and this G is singular (a dead or "
                              "repeated input): drop those inputs or add damping to G before solving")
        deadline = deadline_of(time_limit)
        incumbent = warm_start if warm_start is not None else solve(problem, ["wanda", "refit_swaps"]).mask
        tasks = [(model, row_time_limit, deadline, gap, seed, dict(scip_params or {}))
                 for model in row_models(problem, incumbent, perspective)]
        solution = assemble(problem, map_rows(_solve_row, tasks, workers, executor),
                            {"row_time_limit": row_time_limit, "perspective": perspective})
        solution.row_weight_bound, solution.row_bound = solution.row_bound, None
        solution.weight = refit_weights(problem, solution.mask, damping=0.0)
        solution.message = f"masks and weights together (weight_objective); {solution.message}"
        return solution
