"""The solver registry and the one entry point, `solve()`.

Built-in backends live in the top-level `solvers` package and are listed explicitly below; third-party
backends register through the entry-point group "sparseswaps.solvers" (see README, "Adding a solver").
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import time
from collections.abc import Callable, Sequence

import torch

from .problem import NM, MaskProblem, PerRow, ProblemError
from .result import Solution, SolveResult, Termination

ENTRY_POINT_GROUP = "sparseswaps.solvers"

# name -> module that registers it; imported only when a solver is first asked for.
BUILTIN_SOLVERS = {
    "magnitude": "sparseswaps.solvers.magnitude",
    "wanda": "sparseswaps.solvers.wanda",
    "ria": "sparseswaps.solvers.ria",
    "sparsegpt": "sparseswaps.solvers.sparsegpt",
    "refit": "sparseswaps.solvers.refit",
    "refit_swaps": "sparseswaps.solvers.refit_swaps",
    "admm": "sparseswaps.solvers.admm",
    "alps": "sparseswaps.solvers.alps",
    "dsnot": "sparseswaps.solvers.dsnot",
    "swaps": "sparseswaps.solvers.swaps",
    "bruteforce": "sparseswaps.solvers.bruteforce",
    "bruteforce_refit": "sparseswaps.solvers.bruteforce",
    "scip": "sparseswaps.solvers.scip",
    "highs": "sparseswaps.solvers.highs",
    "scip_refit": "sparseswaps.solvers.scip_refit",
}

_REGISTRY: dict[str, type] = {}
_loaded = False


class SolverError(RuntimeError):
    """A solver could not be found, is unavailable, or was called with options it does not take."""


class Solver:
    """Base class for backends: override `solve`; set the capability flags."""

    name = ""
    exact = False            # proves optimality when it finishes
    gives_bound = False      # reports a valid lower bound
    patterns: tuple = (PerRow, NM)
    warm_start = False       # uses a warm-start mask
    weights = False          # returns re-fitted weights (Solution.weight) beside the mask
    gpu = True               # runs on CUDA when the problem's tensors are there (torch backends)

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, why not). Must not import heavy optional packages."""
        return True, ""

    def version(self) -> str:
        from . import __version__
        return __version__

    def solve(self, problem: MaskProblem, *, warm_start: torch.Tensor | None = None,
              time_limit: float | None = None, seed: int = 0) -> Solution:
        raise NotImplementedError


def register(name: str):
    """Class decorator: make a Solver subclass available as `name`."""
    def decorate(cls):
        if not (isinstance(cls, type) and callable(getattr(cls, "solve", None))):
            raise SolverError(f"register({name!r}) needs a class with a solve() method")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return decorate


_BROKEN: dict[str, str] = {}      # built-in solver -> why its module failed to import


def _import_builtin(name: str) -> None:
    """Import the module that registers built-in solver `name`; a failure marks it unavailable (with the
    reason) instead of breaking every other solver."""
    if name in _REGISTRY or name in _BROKEN:
        return
    try:
        importlib.import_module(BUILTIN_SOLVERS[name])
    except Exception as error:  # noqa: BLE001 - any import failure of one backend must not break the others
        _BROKEN[name] = f"importing {BUILTIN_SOLVERS[name]} failed: {type(error).__name__}: {error}"


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_SOLVERS:
        _import_builtin(name)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in _REGISTRY:
            try:
                register(entry.name)(entry.load())
            except Exception as error:  # noqa: BLE001 - a broken plug-in is listed, not fatal
                _BROKEN[entry.name] = f"loading entry point {entry.value} failed: {type(error).__name__}: {error}"


def solver_classes() -> dict[str, type]:
    """Every solver that imported (the broken ones are in `solver_status`)."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def available_solvers() -> list[str]:
    """Names of the registered solvers that can run here."""
    return [name for name, cls in solver_classes().items() if cls().available()[0]]


def solver_status() -> list[dict]:
    """Every solver, registered or broken: availability (and why not) and capabilities."""
    rows = []
    for name, cls in solver_classes().items():
        ok, why = cls().available()
        rows.append({"name": name, "available": ok, "reason": why, "exact": cls.exact,
                     "bound": cls.gives_bound, "warm_start": cls.warm_start, "weights": cls.weights, "gpu": cls.gpu,
                     "patterns": [p.__name__ for p in cls.patterns]})
    rows += [{"name": name, "available": False, "reason": why, "exact": False, "bound": False,
              "warm_start": False, "weights": False, "gpu": False, "patterns": []} for name, why in sorted(_BROKEN.items())]
    return sorted(rows, key=lambda row: row["name"])


def get_solver(name: str) -> Solver:
    if name in BUILTIN_SOLVERS:
        _import_builtin(name)          # only this backend's module: one broken backend breaks nothing else
    else:
        _load_all()
    if name in _BROKEN:
        raise SolverError(f"solver {name!r} is not available here: {_BROKEN[name]}")
    if name not in _REGISTRY:
        raise SolverError(f"unknown solver {name!r}. Registered: {', '.join(solver_classes())}. "
                          f"Third-party solvers register through the entry-point group {ENTRY_POINT_GROUP!r}.")
    solver = _REGISTRY[name]()
    ok, why = solver.available()
    if not ok:
        usable = ", ".join(available_solvers())
        raise SolverError(f"solver {name!r} is not available here: {why}. Available: {usable}")
    return solver


SolverSpec = str | Solver | Callable | Sequence


def solve(problem: MaskProblem, solver: SolverSpec, *, warm_start: torch.Tensor | SolverSpec | None = None,
          time_limit: float | None = None, seed: int = 0, **options) -> SolveResult:
    """Solve `problem` with `solver` (a registered name, a Solver, a callable, or a list = a chain).

    A chain ["wanda", "swaps", "scip"] hands each result to the next as its warm start; `options` go to
    the last stage. `warm_start` is a bool mask (True = keep) or a solver (spec) that produces one.
    The returned objective is always recomputed here in float64 from the mask.

    `time_limit` is the wall-clock budget in seconds of this whole call, chain and warm-start solver
    included: each stage gets what is left of it (exact solvers spread it over their rows; their own
    `row_time_limit` caps each row). A chain that runs out of time stops after the stage in progress and
    returns that stage's result with termination time_limit.
    """
    if not isinstance(problem, MaskProblem):
        raise ProblemError(f"solve() takes a MaskProblem, got {type(problem).__name__}")
    if time_limit is not None and not time_limit > 0:
        raise SolverError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    deadline = None if time_limit is None else time.monotonic() + time_limit
    chain = list(solver) if isinstance(solver, (list, tuple)) else [solver]
    if warm_start is not None and not isinstance(warm_start, torch.Tensor):
        if not _is_solver_spec(warm_start):
            raise ProblemError(f"warm start must be a torch.Tensor of dtype bool (True = keep) or a solver, "
                               f"got {type(warm_start).__name__}")
        return _solve_chain(problem, [warm_start, *chain], None, deadline, seed, options)
    if isinstance(solver, (list, tuple)):
        return _solve_chain(problem, chain, warm_start, deadline, seed, options)
    if warm_start is not None:
        warm_start = problem.check_mask(warm_start, "warm start")
    return _solve_one(problem, solver, warm_start, time_limit, seed, options)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _solve_chain(problem, stages, warm_start, deadline, seed, options) -> SolveResult:
    if not stages:
        raise SolverError("an empty solver chain: give at least one solver")
    history = [warm_start] if isinstance(warm_start, SolveResult) else []
    current = warm_start.mask if isinstance(warm_start, SolveResult) else warm_start
    for index, stage in enumerate(stages):
        remaining = _remaining(deadline)
        if remaining is not None and remaining <= 0 and history:
            history[-1].termination = Termination.TIME_LIMIT
            history[-1].message = (f"the time limit ran out after stage {len(history)} of the chain "
                                   f"({history[-1].solver}); the later stages did not run")
            break
        stage_options = options if index == len(stages) - 1 else {}
        if isinstance(stage, (list, tuple)):
            result = _solve_chain(problem, list(stage), current, deadline, seed, stage_options)
        else:
            start = None if current is None else problem.check_mask(current, "warm start")
            result = _solve_one(problem, stage, start, None if remaining is None else max(remaining, 1e-3), seed,
                                stage_options)
        history.append(result)
        current = result.mask
    final = history[-1]
    if len(history) > 1:
        final.extra["chain"] = [{"solver": r.solver, "objective": r.objective, "runtime_s": r.runtime_s,
                                 "termination": r.termination.value} for r in history]
        final.extra["warm_start_objective"] = history[-2].objective
        final.extra["warm_start_row_objective"] = history[-2].row_objective
        final.runtime_s = sum(r.runtime_s for r in history)
    return final


def _solve_one(problem, solver, warm_start, time_limit, seed, options) -> SolveResult:
    instance, name = _instantiate(solver)
    if not isinstance(problem.pattern, instance.patterns):
        raise SolverError(f"solver {name!r} does not handle {type(problem.pattern).__name__} patterns "
                          f"({problem.pattern}); it handles {', '.join(p.__name__ for p in instance.patterns)}")
    _check_options(instance, name, options)
    if warm_start is not None and not instance.warm_start:
        raise SolverError(f"solver {name!r} ignores a warm start, so the mask handed to it would be thrown away: "
                          f"drop the warm start (--warm-start none, or the earlier stage of the chain)")
    _synchronize(problem.device)
    start = time.perf_counter()
    solution = instance.solve(problem, warm_start=warm_start, time_limit=time_limit, seed=seed, **options)
    _synchronize(problem.device)
    runtime = time.perf_counter() - start
    if isinstance(solution, torch.Tensor):
        solution = Solution(solution)
    mask = problem.check_mask(solution.mask, f"the mask returned by solver {name!r}")
    row_objective = problem.objective(mask)
    row_bound = solution.row_bound
    bound = float(row_bound.sum()) if row_bound is not None else float("-inf")
    weight = _check_weight(problem, mask, solution.weight, name)
    return SolveResult(mask=mask, objective=float(row_objective.sum()), row_objective=row_objective,
                       termination=Termination(solution.termination), runtime_s=runtime, solver=name,
                       solver_version=instance.version(),
                       options={"time_limit": time_limit, "seed": seed, **options},
                       bound=bound, row_bound=row_bound, extra=solution.extra, weight=weight,
                       row_weight_objective=None if weight is None else problem.reconstruction_error(weight),
                       message=solution.message, row_weight_bound=solution.row_weight_bound)


def _check_weight(problem: MaskProblem, mask: torch.Tensor, weight, name: str) -> torch.Tensor | None:
    """A solver's re-fitted weights: the problem's shape, finite, zero wherever its mask prunes."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(problem.weight.shape):
        raise SolverError(f"solver {name!r} returned weights that are not a tensor of shape {tuple(problem.weight.shape)}")
    weight = weight.to(device=problem.device, dtype=problem.weight.dtype)
    if not bool(torch.isfinite(weight).all()):
        raise SolverError(f"solver {name!r} returned non-finite weights (NaN or Inf)")
    if bool((weight[~mask] != 0).any()):
        raise SolverError(f"solver {name!r} returned weights that are nonzero where its own mask prunes")
    return weight


def _is_solver_spec(spec) -> bool:
    if isinstance(spec, (list, tuple)):
        return len(spec) > 0 and all(_is_solver_spec(item) for item in spec)
    return isinstance(spec, (str, Solver)) or callable(spec)


class _CallableSolver(Solver):
    """Adapts a plain function f(problem, warm_start=..., time_limit=..., seed=..., **options)."""

    warm_start = True        # a function receives the warm start and decides for itself

    def __init__(self, function):
        self.function = function
        self.name = getattr(function, "__name__", "callable")

    def solve(self, problem, *, warm_start=None, time_limit=None, seed=0, **options):
        return self.function(problem, warm_start=warm_start, time_limit=time_limit, seed=seed, **options)


def _instantiate(solver) -> tuple[Solver, str]:
    if isinstance(solver, str):
        instance = get_solver(solver)
        return instance, solver
    if isinstance(solver, Solver):
        return solver, solver.name or type(solver).__name__
    if isinstance(solver, type) and issubclass(solver, Solver):
        return solver(), solver.name or solver.__name__
    if callable(solver):
        instance = _CallableSolver(solver)
        return instance, instance.name
    raise SolverError(f"solver must be a name, a Solver, a callable or a list of those; got {solver!r}")


def _check_options(instance: Solver, name: str, options: dict) -> None:
    parameters = inspect.signature(instance.solve).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p in parameters if p not in ("problem", "warm_start", "time_limit", "seed")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SolverError(f"solver {name!r} does not take option(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(accepted) or 'none'}")


def parse_option_values(pairs, context: str) -> dict:
    """["key=value", ...] -> {key: value}; values are JSON when they parse (numbers, true/false), else strings."""
    import json

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SolverError(f"{context}: options are key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
