"""Exact MIQP through SCIP (pyscipopt), row by row.

Factored epigraph form (SOLVERS.md: far faster than pᵀQp at d >= 32):
    min t + linᵀp   s.t.  r = Aᵀ p,  t >= ||r||²,  Σ_{i in group} p_i = pruned,  p binary,
with A = diag(w) F, F Fᵀ = G - s·diag(G) (s = 0 without the diagonal shift). The objective is divided by
the incumbent's value so SCIP works near 1 (with values near 1e-8 it claimed false optima). The warm start
(default: Wanda + 1-swaps) is SCIP's first incumbent, so a time-out returns at least that mask.
`time_limit` is the whole call's wall-clock budget (rows the budget does not reach return their incumbent);
`row_time_limit` caps each row (the gap harness's per-row limit). The reported bound is SCIP's dual bound less its feasibility tolerance (the
epigraph constraint may be violated by that much), mapped back to original units.
"""
from __future__ import annotations

import time

import numpy as np

from sparseswaps import MaskProblem, Solution, Termination, register

from .exact import (ExactSolver, RowModel, RowOutcome, assemble, deadline_of, default_incumbent, map_rows,
                    objective_scale, row_models, within_budget)

_FEASTOL = 1e-9


# SCIP's getStatus() -> why the row stopped ("gaplimit" at gap 0 is a proof, handled below)
_STATUS = {"optimal": Termination.OPTIMAL, "timelimit": Termination.TIME_LIMIT, "gaplimit": Termination.GAP_LIMIT,
           "memlimit": Termination.MEMORY_LIMIT, "nodelimit": Termination.ITERATION_LIMIT,
           "totalnodelimit": Termination.ITERATION_LIMIT, "stallnodelimit": Termination.ITERATION_LIMIT,
           "sollimit": Termination.ITERATION_LIMIT, "bestsollimit": Termination.ITERATION_LIMIT,
           "restartlimit": Termination.ITERATION_LIMIT, "infeasible": Termination.INFEASIBLE,
           "inforunbd": Termination.INFEASIBLE, "unbounded": Termination.INFEASIBLE}


def row_status(scip_status: str, gap: float) -> tuple[str, str]:
    """(our status, a message where SCIP's status is not one of ours)."""
    if scip_status == "gaplimit" and gap == 0:
        return Termination.OPTIMAL.value, ""
    if scip_status in _STATUS:
        return _STATUS[scip_status].value, ""
    return Termination.ERROR.value, f"SCIP stopped with status {scip_status!r}"


def new_model(time_limit, gap: float, seed: int, params: dict):
    """A quiet SCIP model with the row's limits, seed and parameters."""
    from pyscipopt import Model

    scip = Model()
    scip.hideOutput()
    scip.setParam("limits/gap", gap)
    scip.setParam("randomization/randomseedshift", seed)
    if time_limit is not None:
        scip.setParam("limits/time", time_limit)
    for name, value in params.items():
        scip.setParam(name, value)
    return scip


def dual_bound(scip, scale: float, feastol: float) -> float:
    """SCIP's dual bound less its feasibility tolerance (the epigraph constraint may be violated by that
    much), in original units."""
    dual = scip.getDualbound()
    return max(0.0, (dual - feastol * max(1.0, abs(dual))) * scale)


@within_budget
def _solve_row(model, time_limit, gap, seed, params) -> RowOutcome:
    from pyscipopt import quicksum

    started = time.perf_counter()
    scale = objective_scale(model)
    factor = model.factor / np.sqrt(scale)
    linear = model.linear / scale
    scip = new_model(time_limit, gap, seed, {"separating/aggregation/freq": -1, "numerics/feastol": _FEASTOL,
                                             **params})
    d, rank = factor.shape
    p = [scip.addVar(vtype="B", name=f"p{i}") for i in range(d)]
    r = [scip.addVar(lb=None, name=f"r{k}") for k in range(rank)]
    t = scip.addVar(lb=0, name="t")
    for k in range(rank):
        scip.addCons(quicksum(factor[i, k] * p[i] for i in range(d) if factor[i, k] != 0) == r[k])
    scip.addCons(quicksum(rk * rk for rk in r) <= t)
    for indices, pruned in model.groups:
        scip.addCons(quicksum(p[i] for i in indices) == pruned)
    scip.setObjective(t + quicksum(linear[i] * p[i] for i in range(d) if linear[i] != 0), "minimize")
    _add_incumbent(scip, p, r, t, factor, model.incumbent)
    scip.optimize()
    status = scip.getStatus()
    best = scip.getBestSol()
    prune = np.array([scip.getSolVal(best, v) > 0.5 for v in p]) if scip.getNSols() else model.incumbent
    bound = dual_bound(scip, scale, _FEASTOL)
    ours, message = row_status(status, gap)
    return RowOutcome(prune=prune, bound=min(bound, model.value(prune)), status=ours, nodes=int(scip.getNNodes()),
                      seconds=time.perf_counter() - started, message=message)


def _add_incumbent(scip, p, r, t, factor, prune) -> None:
    values = factor.T @ prune.astype(np.float64)
    add_solution(scip, [(p, prune), (r, values), ([t], [values @ values])])


def add_solution(scip, assignments) -> None:
    """Hand SCIP a solution: (variables, values) pairs covering every variable."""
    solution = scip.createSol()
    for variables, values in assignments:
        for variable, value in zip(variables, values):
            scip.setSolVal(solution, variable, float(value))
    scip.addSol(solution, free=True)


@register("scip")
class ScipSolver(ExactSolver):
    package = "pyscipopt"

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, gap: float = 0.0,
              diagonal_shift: bool = False, workers: int = 1, row_time_limit: float | None = None,
              scip_params: dict | None = None, executor: str = "process") -> Solution:
        deadline = deadline_of(time_limit)
        incumbent = warm_start if warm_start is not None else default_incumbent(problem)
        models: list[RowModel] = row_models(problem, incumbent, diagonal_shift)
        tasks = [(model, row_time_limit, deadline, gap, seed, dict(scip_params or {})) for model in models]
        outcomes = map_rows(_solve_row, tasks, workers, executor)
        return assemble(problem, outcomes, {"diagonal_shift": diagonal_shift, "row_time_limit": row_time_limit})
