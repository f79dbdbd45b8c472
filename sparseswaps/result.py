"""What every backend returns: a mask, its float64 objective, a certified bound where one exists."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch


class Termination(str, Enum):
    """Why a solver stopped. What it returned is `SolutionStatus`."""
    OPTIMAL = "optimal"                  # proven optimal (every row)
    LOCAL_OPTIMUM = "local_optimum"      # no improving move of the method's kind is left
    TIME_LIMIT = "time_limit"            # stopped by the time limit; best mask found so far
    ITERATION_LIMIT = "iteration_limit"  # stopped by an iteration, node or solution-count limit
    GAP_LIMIT = "gap_limit"              # stopped at the relative gap it was asked for
    MEMORY_LIMIT = "memory_limit"        # stopped by a memory limit; best mask found so far
    INFEASIBLE = "infeasible"            # a sub-solver declared a row model infeasible (a modelling error)
    HEURISTIC = "heuristic"              # a rule with no optimality claim (or a bound that certifies nothing)
    ERROR = "error"


class SolutionStatus(str, Enum):
    """What the result is. There is no "none": the registry refuses any output that is not a feasible mask,
    so a solver that finds nothing of its own returns its incumbent, which is feasible."""
    OPTIMAL = "optimal"                  # proven optimal (every row)
    FEASIBLE = "feasible"                # feasible, optimality not proven


@dataclass
class Solution:
    """What a backend hands back to `sparseswaps.solve`, which measures and completes it."""

    mask: torch.Tensor
    termination: Termination = Termination.HEURISTIC
    row_bound: torch.Tensor | None = None      # valid per-row lower bounds, float64
    extra: dict = field(default_factory=dict)
    weight: torch.Tensor | None = None         # re-fitted weights, zero outside the mask (weight-updating solvers)
    message: str = ""                          # why it stopped, in words (e.g. rows per sub-solver status)
    row_weight_bound: torch.Tensor | None = None   # valid per-row lower bounds on the masks-and-weights optimum


@dataclass
class SolveResult:
    mask: torch.Tensor                   # bool [rows, d], True = keep
    objective: float                     # total, recomputed in float64 from the mask
    row_objective: torch.Tensor          # float64 [rows]
    termination: Termination
    runtime_s: float                     # wall time, CUDA-synchronised
    solver: str
    solver_version: str
    options: dict = field(default_factory=dict)
    bound: float = -math.inf             # valid lower bound on the optimum, sum of row bounds
    row_bound: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    weight: torch.Tensor | None = None             # re-fitted kept weights (None: the mask keeps w as it is)
    row_weight_objective: torch.Tensor | None = None   # float64 [rows]: (w - weight)ᵀ G (w - weight)
    message: str = ""
    row_weight_bound: torch.Tensor | None = None       # float64 [rows]: lower bounds on the weight_objective optimum

    @property
    def status(self) -> SolutionStatus:
        return SolutionStatus.OPTIMAL if self.termination == Termination.OPTIMAL else SolutionStatus.FEASIBLE

    @property
    def weight_objective(self) -> float | None:
        """Total error with the re-fitted weights, recomputed in float64 (None for mask-only solvers)."""
        return None if self.row_weight_objective is None else float(self.row_weight_objective.sum())

    @property
    def gap(self) -> float:
        """(objective - bound) / objective: 0 when proven optimal, inf without a bound."""
        if self.objective == 0:
            return 0.0
        if self.bound == -math.inf:
            return math.inf
        return max(0.0, (self.objective - self.bound) / self.objective)

    @property
    def weight_gap(self) -> float | None:
        """(weight_objective - its bound) / weight_objective, for solvers that bound masks and weights together."""
        if self.row_weight_bound is None or self.weight_objective is None:
            return None
        if self.weight_objective == 0:
            return 0.0
        return max(0.0, (self.weight_objective - float(self.row_weight_bound.sum())) / self.weight_objective)

    def summary(self) -> dict:
        """JSON-ready description (no tensors)."""
        return {
            "solver": self.solver,
            "solver_version": self.solver_version,
            "termination": self.termination.value,
            "status": self.status.value,
            "message": self.message,
            "objective": self.objective,
            "weight_objective": self.weight_objective,
            "weight_gap": None if self.weight_gap is None else _json_float(self.weight_gap),
            "bound": _json_float(self.bound),
            "gap": _json_float(self.gap),
            "runtime_s": self.runtime_s,
            "options": _jsonable(self.options),
            "extra": _jsonable(self.extra),
        }

    def save(self, path: str | Path) -> None:
        """Mask and per-row numbers to `path`.safetensors, the rest to `path`.json (each written whole or not
        at all)."""
        from .checkpoint import write_json_atomic, write_safetensors_atomic

        path = Path(path)
        tensors = {"mask": self.mask.cpu().contiguous(), "row_objective": self.row_objective.cpu()}
        if self.weight is not None:
            tensors["weight"] = self.weight.cpu().contiguous()
            tensors["row_weight_objective"] = self.row_weight_objective.cpu()
        if self.row_bound is not None:
            tensors["row_bound"] = self.row_bound.cpu().to(torch.float64)
        if self.row_weight_bound is not None:
            tensors["row_weight_bound"] = self.row_weight_bound.cpu().to(torch.float64)
        write_safetensors_atomic(path.with_suffix(".safetensors"), tensors)
        write_json_atomic(path.with_suffix(".json"), self.summary())

    @classmethod
    def load(cls, path: str | Path) -> "SolveResult":
        from safetensors.torch import load_file

        path = Path(path)
        tensors = load_file(str(path.with_suffix(".safetensors")))
        meta = json.loads(path.with_suffix(".json").read_text())
        bound = meta["bound"]
        return cls(mask=tensors["mask"], objective=meta["objective"], row_objective=tensors["row_objective"],
                   termination=Termination(meta["termination"]), runtime_s=meta["runtime_s"],
                   solver=meta["solver"], solver_version=meta["solver_version"], options=meta["options"],
                   bound=-math.inf if bound is None else bound, row_bound=tensors.get("row_bound"),
                   extra=meta["extra"], weight=tensors.get("weight"),
                   row_weight_objective=tensors.get("row_weight_objective"), message=meta.get("message", ""),
                   row_weight_bound=tensors.get("row_weight_bound"))


def _json_float(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


def _jsonable(value):
    """Drop what JSON cannot hold (tensors, callables); keep numbers, strings, lists and dicts."""
    if isinstance(value, dict):
        kept = {str(k): _jsonable(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_jsonable, value) if v is not _DROP]
    if isinstance(value, float):
        return _json_float(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return _DROP


_DROP = object()
