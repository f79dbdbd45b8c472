"""HiGHS (highspy) routes to optima and bounds. HiGHS has no MIQP, so:

- method="milp" (exact): the linearised model. y_ij stands for p_i p_j (i < j) with McCormick inequalities
  and the RLT equalities from multiplying each cardinality row by p_i: Σ_{j in g, j≠i} y_ij = (k_g - [i in g]) p_i.
  Objective Σ Q_ii p_i + 2 Σ_{i<j} Q_ij y_ij, scaled by the incumbent's value; mip_rel_gap = 0.
- method="qp_bound" (a bound for rows of any width): the continuous relaxation of the diagonally shifted
  model, min pᵀQ'p + linᵀp over 0 <= p <= 1 with the cardinality rows. HiGHS solves it; the bound reported is
  recomputed here in float64 as min over the box of the Lagrangian's tangent plane at HiGHS's point, valid
  for any point and multipliers, so it does not depend on HiGHS's tolerances. The mask is the incumbent.
`time_limit` is the whole call's wall-clock budget (rows the budget does not reach return their incumbent);
`row_time_limit` caps each row. A HiGHS status other than optimal is reported as what it is (time, iteration
or memory limit, infeasible, or an error naming HiGHS's status).
"""
from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from sparseswaps import MaskProblem, Solution, Termination, register
from sparseswaps.registry import SolverError

from .exact import (ExactSolver, RowModel, RowOutcome, assemble, deadline_of, default_incumbent, map_rows,
                    objective_scale, row_models, within_budget)

_BOUND_SLACK = 1e-9


def _new_highs(time_limit, seed, threads):
    import highspy

    highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    highs.setOptionValue("threads", threads)
    highs.setOptionValue("random_seed", seed)
    if time_limit is not None:
        highs.setOptionValue("time_limit", float(time_limit))
    return highs


def _add_rows(highs, matrix: sp.csr_matrix, lower: np.ndarray, upper: np.ndarray) -> None:
    highs.addRows(matrix.shape[0], lower, upper, matrix.nnz, matrix.indptr.astype(np.int32),
                  matrix.indices.astype(np.int32), matrix.data)


def _milp_rows(d: int, groups) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Constraint rows over columns [p (d), y (d(d-1)/2)]; also the pair index arrays."""
    first, second = np.triu_indices(d, 1)
    pairs = len(first)
    pair_col = d + np.arange(pairs)
    pair_of = np.full((d, d), -1)
    pair_of[first, second] = pair_col
    pair_of[second, first] = pair_col
    rows, cols, vals, lower, upper = [], [], [], [], []

    def add(columns, values, lo, hi):
        rows.extend([len(lower)] * len(columns))
        cols.extend(columns)
        vals.extend(values)
        lower.append(lo)
        upper.append(hi)

    for k in range(pairs):   # McCormick: y <= p_i, y <= p_j, y >= p_i + p_j - 1
        i, j, y = first[k], second[k], pair_col[k]
        add([y, i], [1.0, -1.0], -np.inf, 0.0)
        add([y, j], [1.0, -1.0], -np.inf, 0.0)
        add([y, i, j], [1.0, -1.0, -1.0], -1.0, np.inf)
    for indices, pruned in groups:
        add(list(indices), [1.0] * len(indices), pruned, pruned)
        member = np.zeros(d, dtype=bool)
        member[indices] = True
        for i in range(d):   # RLT: (Σ_g p_j - k_g) p_i = 0
            partners = [pair_of[i, j] for j in indices if j != i]
            add(partners + [i], [1.0] * len(partners) + [-(pruned - member[i])], 0.0, 0.0)
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(len(lower), d + pairs))
    return matrix, np.array(lower), np.array(upper), first, second


# HighsModelStatus name -> why the row stopped
_STATUS = {"kOptimal": Termination.OPTIMAL, "kTimeLimit": Termination.TIME_LIMIT,
           "kIterationLimit": Termination.ITERATION_LIMIT, "kSolutionLimit": Termination.ITERATION_LIMIT,
           "kMemoryLimit": Termination.MEMORY_LIMIT, "kInfeasible": Termination.INFEASIBLE,
           "kUnboundedOrInfeasible": Termination.INFEASIBLE, "kUnbounded": Termination.INFEASIBLE}


def row_status(highs_status) -> tuple[str, str]:
    """(our status, a message where HiGHS's status is not one of ours)."""
    name = getattr(highs_status, "name", str(highs_status).rsplit(".", 1)[-1])
    if name in _STATUS:
        return _STATUS[name].value, ""
    return Termination.ERROR.value, f"HiGHS stopped with model status {name}"


@within_budget
def _solve_row_milp(model, time_limit, seed, threads) -> RowOutcome:
    import highspy

    started = time.perf_counter()
    d = len(model.w)
    scale = objective_scale(model)
    quad = (model.quad + np.diag(model.linear)) / scale   # Q_ii p_i absorbs the linear term on binaries
    matrix, lower, upper, first, second = _milp_rows(d, model.groups)
    columns = matrix.shape[1]
    highs = _new_highs(time_limit, seed, threads)
    highs.setOptionValue("mip_rel_gap", 0.0)
    highs.addVars(columns, np.zeros(columns), np.ones(columns))
    cost = np.concatenate([np.diag(quad), 2 * quad[first, second]])
    highs.changeColsCost(columns, np.arange(columns, dtype=np.int32), cost)
    highs.changeColsIntegrality(d, np.arange(d, dtype=np.int32),
                                np.array([highspy.HighsVarType.kInteger] * d))
    _add_rows(highs, matrix, lower, upper)
    start = model.incumbent.astype(np.float64)
    solution = highspy.HighsSolution()
    solution.col_value = list(np.concatenate([start, start[first] * start[second]]))
    solution.value_valid = True
    highs.setSolution(solution)
    highs.run()
    status = highs.getModelStatus()
    values = np.array(highs.getSolution().col_value[:d]) if highs.getInfo().primal_solution_status else None
    prune = values > 0.5 if values is not None else model.incumbent
    if model.value(prune) > model.value(model.incumbent):
        prune = model.incumbent
    dual = highs.getInfo().mip_dual_bound
    bound = max(0.0, (dual - _BOUND_SLACK * max(1.0, abs(dual))) * scale) if np.isfinite(dual) else 0.0
    ours, message = row_status(status)
    return RowOutcome(prune=prune, bound=min(bound, model.value(prune)), status=ours,
                      nodes=int(highs.getInfo().mip_node_count), seconds=time.perf_counter() - started,
                      message=message)


def certified_relaxation_bound(quad, linear, groups, point) -> float:
    """min over the box of the tangent plane of the Lagrangian at `point`: a valid lower bound for any point
    (quad PSD). Multipliers are fitted so the gradient vanishes on the free coordinates of each group."""
    point = np.clip(point, 0.0, 1.0)
    gradient = 2 * quad @ point + linear
    multipliers = np.zeros_like(point)
    constant = 0.0
    for indices, pruned in groups:
        free = indices[(point[indices] > 1e-9) & (point[indices] < 1 - 1e-9)]
        value = float(np.median(gradient[free])) if len(free) else float(np.median(gradient[indices]))
        multipliers[indices] += value
        constant += value * pruned
    lagrangian_gradient = gradient - multipliers
    value = float(point @ quad @ point + linear @ point - multipliers @ point + constant)
    box_min = np.minimum(lagrangian_gradient * (0 - point), lagrangian_gradient * (1 - point)).sum()
    return value + float(box_min)


@within_budget
def _solve_row_qp(model, time_limit, seed, threads) -> RowOutcome:
    import highspy

    started = time.perf_counter()
    d = len(model.w)
    scale = objective_scale(model)
    quad, linear = model.quad / scale, model.linear / scale
    highs = _new_highs(time_limit, seed, threads)
    highs.addVars(d, np.zeros(d), np.ones(d))
    highs.changeColsCost(d, np.arange(d, dtype=np.int32), linear)
    rows = sp.csr_matrix(np.stack([np.isin(np.arange(d), idx).astype(float) for idx, _ in model.groups]))
    counts = np.array([float(k) for _, k in model.groups])
    _add_rows(highs, rows, counts, counts)
    hessian = sp.csc_matrix(np.tril(2 * quad))   # HiGHS minimises ½ xᵀHx + cᵀx, lower triangle by column
    highs.passHessian(d, hessian.nnz, highspy.HessianFormat.kTriangular, hessian.indptr.astype(np.int32),
                      hessian.indices.astype(np.int32), hessian.data)
    highs.run()
    point = np.array(highs.getSolution().col_value)
    bound = certified_relaxation_bound(quad, linear, model.groups, point) if len(point) == d else 0.0
    bound = max(0.0, bound * scale * (1 - _BOUND_SLACK))
    value = model.value(model.incumbent)
    relaxation, message = row_status(highs.getModelStatus())
    if relaxation == Termination.OPTIMAL.value:   # the relaxation solved: the bound certifies the row or not
        relaxation = Termination.OPTIMAL.value if bound >= value * (1 - 1e-9) else Termination.HEURISTIC.value
    return RowOutcome(prune=model.incumbent, bound=min(bound, value), status=relaxation, nodes=0,
                      seconds=time.perf_counter() - started, message=message)


_METHODS = {"milp": _solve_row_milp, "qp_bound": _solve_row_qp}


@register("highs")
class HighsSolver(ExactSolver):
    package = "highspy"

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, method: str = "milp",
              diagonal_shift: bool = True, threads: int = 1, workers: int = 1,
              row_time_limit: float | None = None, executor: str = "process") -> Solution:
        if method not in _METHODS:
            raise SolverError(f"highs method must be one of {', '.join(_METHODS)}, got {method!r}")
        deadline = deadline_of(time_limit)
        incumbent = warm_start if warm_start is not None else default_incumbent(problem)
        models: list[RowModel] = row_models(problem, incumbent, diagonal_shift and method == "qp_bound")
        tasks = [(model, row_time_limit, deadline, seed, threads) for model in models]
        outcomes = map_rows(_METHODS[method], tasks, workers, executor)
        return assemble(problem, outcomes, {"method": method, "row_time_limit": row_time_limit})
