"""sparseswaps: layer-wise mask selection for post-training pruning of LLMs."""
__version__ = "0.1.0"

from .problem import NM, MaskProblem, PerRow, ProblemError, mask_from_scores, parse_nm
from .registry import (Solver, SolverError, available_solvers, get_solver, register, solve, solver_classes,
                       solver_status)
from .result import Solution, SolutionStatus, SolveResult, Termination

__all__ = ["MaskProblem", "PerRow", "NM", "ProblemError", "mask_from_scores", "parse_nm", "Solver",
           "SolverError", "register", "solve", "available_solvers", "get_solver", "solver_classes",
           "solver_status", "Solution", "SolutionStatus", "SolveResult", "Termination", "__version__"]
