"""Pieces shared by the exact backends (SCIP, HiGHS): row models, the diagonal shift, row pools.

Each row is min_p pᵀQp over binary prune indicators p (p = 1 - m) with a fixed count per row or per N:M
group, Q = diag(w) G diag(w). Because p_i² = p_i, any s with G - s·diag(G) PSD gives the same objective on
binary p as pᵀ Q' p + s Σ Q_ii p_i with Q' = diag(w) (G - s diag(G)) diag(w), and a tighter relaxation.
The largest such s is the smallest eigenvalue of G's correlation matrix (independent of w).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sparseswaps import MaskProblem, PerRow, Solution, Solver, SolverError, Termination, mask_from_scores

# Keep the shift a hair inside the PSD limit so rounding cannot make Q' indefinite.
_SHIFT_SAFETY = 1 - 1e-7


class ExactSolver(Solver):
    """A backend built on an optional optimisation package, row by row."""

    exact = True
    gives_bound = True
    warm_start = True
    gpu = False       # CPU optimisation packages, fed float64 numpy copies
    package = ""

    def available(self):
        if importlib.util.find_spec(self.package) is None:
            return False, f"{self.package} is not installed (pip install 'sparseswaps[exact]')"
        return True, ""

    def version(self) -> str:
        return f"{self.package} {importlib.metadata.version(self.package)}"


def prune_groups(d: int, pattern) -> list[tuple[np.ndarray, int]]:
    """(indices, number pruned) for every cardinality constraint of a row."""
    if isinstance(pattern, PerRow):
        return [(np.arange(d), d - pattern.keep)]
    return [(np.arange(start, start + pattern.m), pattern.m - pattern.n) for start in range(0, d, pattern.m)]


def diagonal_shift(gram: np.ndarray) -> float:
    """Largest s >= 0 (with a safety margin) such that G - s·diag(G) stays PSD."""
    diag = np.diag(gram)
    live = diag > 0
    if not live.any():
        return 0.0
    scale = 1 / np.sqrt(diag[live])
    correlation = gram[np.ix_(live, live)] * scale[:, None] * scale[None, :]
    return max(0.0, float(np.linalg.eigvalsh(correlation)[0]) * _SHIFT_SAFETY)


def psd_factor(matrix: np.ndarray) -> np.ndarray:
    """F with F Fᵀ ≈ matrix (PSD), dropping eigenvalues below 1e-12 of the largest."""
    values, vectors = np.linalg.eigh(matrix)
    keep = values > 1e-12 * max(values[-1], 0.0)
    return vectors[:, keep] * np.sqrt(values[keep])


@dataclass
class RowModel:
    """One row's problem in the form the exact backends take: min ||Aᵀ p||² + linᵀ p."""

    w: np.ndarray            # row weights, float64
    quad: np.ndarray         # Q' = diag(w) (G - s diag G) diag(w)
    factor: np.ndarray       # A = diag(w) F with F Fᵀ = G - s diag G: the quadratic is ||Aᵀ p||²
    linear: np.ndarray       # s · Q_ii
    groups: list
    incumbent: np.ndarray    # prune indicators of the warm start (bool)

    def value(self, prune: np.ndarray) -> float:
        p = prune.astype(np.float64)
        return float(p @ self.quad @ p + self.linear @ p)


def row_models(problem: MaskProblem, warm_start: torch.Tensor, shift: bool) -> list[RowModel]:
    gram = problem.gram.detach().cpu().to(torch.float64).numpy()
    s = diagonal_shift(gram) if shift else 0.0
    shifted = gram - s * np.diag(np.diag(gram))
    factor = psd_factor(shifted)
    groups = prune_groups(problem.d, problem.pattern)
    weights = problem.weight.detach().cpu().to(torch.float64).numpy()
    prune = (~warm_start).cpu().numpy()
    models = []
    for w, p in zip(weights, prune):
        models.append(RowModel(w=w, quad=w[:, None] * shifted * w[None, :], factor=w[:, None] * factor,
                               linear=s * w * w * np.diag(gram), groups=groups, incumbent=p))
    return models


def default_incumbent(problem: MaskProblem) -> torch.Tensor:
    """Wanda's mask refined by 1-swaps: a strong incumbent costs milliseconds per row."""
    from sparseswaps.solvers.swaps import refine

    wanda = mask_from_scores(problem.wanda_scores(), problem.pattern)
    return refine(problem, wanda, dtype=torch.float64).mask


EXECUTORS = ("process", "ray")


def map_rows(function, tasks: list, workers: int, executor: str = "process") -> list:
    """function over tasks, in task order: on a Ray cluster (`executor="ray"`: every task at once, the
    cluster's CPUs deciding how many run together), in a process pool of `workers`, or in this process."""
    if executor not in EXECUTORS:
        raise SolverError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "ray":
        return ray_map(function, tasks)
    if workers <= 1 or len(tasks) <= 1:
        return [function(task) for task in tasks]
    with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread_per_worker) as pool:
        return list(pool.map(function, tasks))


def _one_thread_per_worker() -> None:
    """A forked worker inherits the parent's OpenMP state but not its threads, so a threaded BLAS call (MKL's
    dgemm inside a least-squares solve) would wait for them forever; one thread each also keeps `workers`
    processes from oversubscribing the cores."""
    torch.set_num_threads(1)


def ray_map(function, tasks: list) -> list:
    """Row solves as Ray tasks: on the cluster RAY_ADDRESS names, else on a local Ray started here."""
    if importlib.util.find_spec("ray") is None:
        raise SolverError("executor 'ray' needs Ray: pip install 'sparseswaps[ray]'")
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_run_task)
    return ray.get([remote.remote(function, task) for task in tasks])


def _run_task(function, task):
    """Ray reads a remote function's signature, and a `within_budget` wrapper shows the wrapped row solver's,
    not the one-task call it takes: Ray runs this plain caller instead."""
    return function(task)


@dataclass
class RowOutcome:
    prune: np.ndarray
    bound: float             # valid lower bound on the row optimum (original units)
    status: str              # a Termination value: why this row's solve stopped
    nodes: int
    seconds: float
    message: str = ""        # the sub-solver's own status where it is not one of ours


# A layer stops for the most serious reason any of its rows stopped for.
_SEVERITY = [Termination.ERROR, Termination.INFEASIBLE, Termination.MEMORY_LIMIT, Termination.TIME_LIMIT,
             Termination.ITERATION_LIMIT, Termination.GAP_LIMIT, Termination.HEURISTIC]


def assemble(problem: MaskProblem, outcomes: list[RowOutcome], extra: dict) -> Solution:
    mask = torch.from_numpy(~np.stack([o.prune for o in outcomes])).to(problem.device)
    row_bound = torch.tensor([o.bound for o in outcomes], dtype=torch.float64)
    statuses = [o.status for o in outcomes]
    counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
    termination = next((t for t in _SEVERITY if t.value in counts), Termination.OPTIMAL)
    notes = sorted({o.message for o in outcomes if o.message})
    message = "; ".join([f"{count} of {len(statuses)} rows {status.replace('_', ' ')}"
                         for status, count in counts.items()] + notes)
    extra.update(row_status=statuses, rows_optimal=statuses.count("optimal"),
                 nodes=sum(o.nodes for o in outcomes), row_seconds=[o.seconds for o in outcomes])
    return Solution(mask, termination, row_bound=row_bound, extra=extra, message=message)


def row_limit(row_time_limit: float | None, deadline: float | None) -> float | None:
    """Seconds this row may take: its own cap and what is left of the call's wall-clock budget (`deadline`
    in time.time() seconds, so it holds in pool workers too)."""
    left = None if deadline is None else deadline - time.time()
    limits = [limit for limit in (row_time_limit, left) if limit is not None]
    return min(limits) if limits else None


def within_budget(solve_row):
    """Wraps a row solver f(model, time_limit, *rest) into one taking the task (model, row_time_limit,
    deadline, *rest): its limit is the smaller of the row's cap and what is left of the call's budget, and a
    row the budget does not reach returns its incumbent with the trivial bound."""
    @functools.wraps(solve_row)
    def run(task) -> RowOutcome:
        model, row_time_limit, deadline, *rest = task
        limit = row_limit(row_time_limit, deadline)
        if limit is not None and limit <= 0:
            return RowOutcome(prune=model.incumbent, bound=0.0, status=Termination.TIME_LIMIT.value, nodes=0,
                              seconds=0.0)
        return solve_row(model, limit, *rest)
    return run


def deadline_of(time_limit: float | None) -> float | None:
    return None if time_limit is None else time.time() + time_limit


def objective_scale(model: RowModel) -> float:
    """The incumbent's value: dividing by it makes the solver's objective O(1) (see SOLVERS.md)."""
    value = model.value(model.incumbent)
    return value if value > 0 and math.isfinite(value) else 1.0
