"""The row-decoupled mask-selection problem.

For a linear layer with weight W [rows, d] and calibration inputs X [tokens, d], choose a mask M
(True = keep) minimising ||X (W ⊙ ¬M)ᵀ||_F^2 = sum_r (w_r ⊙ ¬m_r)ᵀ G (w_r ⊙ ¬m_r) with G = Xᵀ X.
Every row keeps the same number of weights (or N of every M consecutive inputs), so rows decouple.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Rows per chunk when the objective is evaluated in float64: bounds memory on wide layers.
_OBJECTIVE_CHUNK = 1024
# Full eigenvalue check of G only up to this width; wider layers get the cheap necessary checks.
_EIGEN_CHECK_MAX_D = 2048


class ProblemError(ValueError):
    """Bad input to a mask-selection problem; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class PerRow:
    """Keep exactly `keep` weights in every row."""

    keep: int

    def __str__(self) -> str:
        return f"keep {self.keep} per row"


@dataclass(frozen=True)
class NM:
    """Keep `n` of every `m` consecutive inputs of each row (N:M semi-structured sparsity)."""

    n: int
    m: int

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = PerRow | NM


def parse_nm(text: str) -> NM:
    """Parse "N:M" (keep N of every M consecutive inputs)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise ProblemError(f"pattern {text!r} is not of the form 'N:M' (keep N of every M), e.g. '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ProblemError(f"pattern {text!r} needs 0 < N < M: it keeps N of every M consecutive inputs")
    return NM(n, m)


def keep_per_row(d: int, sparsity: float) -> int:
    """Weights kept per row at `sparsity`, rounded as Wanda does: it prunes int(d * sparsity) per row."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ProblemError(f"sparsity must be a number strictly between 0 and 1 (the share pruned), got {sparsity!r}")
    pruned = int(d * sparsity)
    if pruned == 0 or pruned == d:
        raise ProblemError(f"sparsity {sparsity} prunes {pruned} of the {d} weights of each row: "
                           "choose a sparsity that prunes at least one weight and keeps at least one")
    return d - pruned


def resolve_pattern(d: int, sparsity: float | None = None, pattern: str | Pattern | None = None) -> Pattern:
    """The pattern for a row of width d, from exactly one of `sparsity` or `pattern`."""
    if (sparsity is None) == (pattern is None):
        raise ProblemError("give exactly one of sparsity=<share pruned per row> or pattern='N:M'")
    if sparsity is not None:
        return PerRow(keep_per_row(d, sparsity))
    if isinstance(pattern, str):
        pattern = parse_nm(pattern)
    if isinstance(pattern, PerRow):
        if not 0 < pattern.keep < d:
            raise ProblemError(f"PerRow(keep={pattern.keep}) must keep between 1 and {d - 1} of the {d} weights")
        return pattern
    if isinstance(pattern, NM):
        if not 0 < pattern.n < pattern.m:
            raise ProblemError(f"N:M pattern {pattern} needs 0 < N < M")
        if d % pattern.m:
            raise ProblemError(f"N:M pattern {pattern}: the layer width {d} is not divisible by M={pattern.m}; "
                               "choose an M that divides the number of inputs")
        return pattern
    raise ProblemError(f"pattern must be a string 'N:M', PerRow or NM, got {type(pattern).__name__}")


def mask_from_scores(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the highest scores of every row (or N:M group).

    Ties are broken as Wanda breaks them: a stable ascending sort prunes the lower index first.
    """
    rows, d = scores.shape
    mask = torch.ones(rows, d, dtype=torch.bool, device=scores.device)
    if isinstance(pattern, PerRow):
        order = torch.sort(scores, dim=1, stable=True).indices
        mask.scatter_(1, order[:, : d - pattern.keep], False)
        return mask
    groups = scores.reshape(rows, d // pattern.m, pattern.m)
    order = torch.sort(groups, dim=2, stable=True).indices
    mask.view(rows, d // pattern.m, pattern.m).scatter_(2, order[..., : pattern.m - pattern.n], False)
    return mask


def pruned_first(mask: torch.Tensor) -> torch.Tensor:
    """Column indices of each row: pruned entries first, then kept ones, each in ascending order."""
    d = mask.shape[1]
    return torch.sort(mask.long() * d + torch.arange(d, device=mask.device), dim=1).indices


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row (0 = smallest), ties by index."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


class MaskProblem:
    """One layer's mask-selection problem: weight [rows, d], Gram matrix G = Xᵀ X [d, d], pattern.

    `sparsity` (share pruned in every row) or `pattern` ("N:M", keep N of every M consecutive inputs).
    Optional first-moment statistics (`input_mean`, `num_tokens`, `num_samples`) serve backends such as
    DSnoT that need more than G.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, sparsity: float | None = None,
                 pattern: str | Pattern | None = None, *, input_mean: torch.Tensor | None = None,
                 num_tokens: int | None = None, num_samples: int | None = None, name: str = "",
                 check_psd: bool = True):
        self.weight = _as_float_matrix(weight, "weight")
        self.gram = _as_float_matrix(gram, "gram")
        self.name = name
        rows, d = self.weight.shape
        if self.gram.shape != (d, d):
            raise ProblemError(f"gram has shape {tuple(self.gram.shape)} but weight is {rows} x {d}: "
                               f"G must be {d} x {d} (G = X^T X over the layer's {d} inputs)")
        if self.gram.device != self.weight.device:
            raise ProblemError(f"weight is on {self.weight.device} but gram is on {self.gram.device}: move both to one device")
        _check_finite(self.weight, "weight")
        _check_finite(self.gram, "gram")
        _check_symmetric_psd(self.gram, full=check_psd)
        self.pattern = resolve_pattern(d, sparsity, pattern)
        self.sparsity = sparsity
        self.input_mean = None if input_mean is None else _as_vector(input_mean, d, self.weight.device)
        self.num_tokens = num_tokens
        self.num_samples = num_samples

    @classmethod
    def from_inputs(cls, weight: torch.Tensor, inputs: torch.Tensor, sparsity: float | None = None,
                    pattern: str | Pattern | None = None, **kwargs) -> "MaskProblem":
        """Build the problem from calibration inputs X [..., d] (tokens along the leading dimensions)."""
        weight = _as_float_matrix(weight, "weight")
        inputs = torch.as_tensor(inputs)
        if inputs.ndim < 2 or inputs.shape[-1] != weight.shape[1]:
            raise ProblemError(f"inputs have shape {tuple(inputs.shape)}; expected [..., {weight.shape[1]}] "
                               "(tokens first, the layer's inputs last)")
        x = inputs.reshape(-1, inputs.shape[-1]).to(device=weight.device, dtype=torch.float64)
        _check_finite(x, "inputs")
        samples = inputs.shape[0] if inputs.ndim == 3 else None
        return cls(weight, x.T @ x, sparsity, pattern, input_mean=x.mean(0), num_tokens=x.shape[0],
                   num_samples=samples, **kwargs)

    # ---- shape and pattern -------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def d(self) -> int:
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def keep(self) -> int:
        """Weights kept in every row."""
        if isinstance(self.pattern, PerRow):
            return self.pattern.keep
        return self.d // self.pattern.m * self.pattern.n

    def describe(self) -> str:
        return f"{self.rows} x {self.d}, {self.pattern}" + (f" ({self.name})" if self.name else "")

    def subset(self, rows: torch.Tensor | slice | list[int]) -> "MaskProblem":
        """The same problem restricted to some rows (rows are independent)."""
        sub = object.__new__(MaskProblem)
        sub.__dict__.update(self.__dict__)
        sub.weight = self.weight[rows]
        if sub.weight.ndim != 2:
            raise ProblemError("subset() takes a slice or a list of row indices")
        return sub

    def to(self, device: str | torch.device) -> "MaskProblem":
        moved = object.__new__(MaskProblem)
        moved.__dict__.update(self.__dict__)
        moved.weight = self.weight.to(device)
        moved.gram = self.gram.to(device)
        if self.input_mean is not None:
            moved.input_mean = self.input_mean.to(device)
        return moved

    # ---- masks -----------------------------------------------------------------------------
    def check_mask(self, mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
        """Raise ProblemError unless `mask` is a feasible bool mask of the right shape; return it on our device."""
        if not isinstance(mask, torch.Tensor):
            raise ProblemError(f"{what} must be a torch.Tensor of dtype bool (True = keep), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ProblemError(f"{what} has dtype {mask.dtype}; it must be torch.bool with True = keep "
                               "(convert with mask.bool() if 1 means keep)")
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ProblemError(f"{what} has shape {tuple(mask.shape)}; the weight is {tuple(self.weight.shape)}")
        mask = mask.to(self.device)
        violations = self._count_violations(mask)
        if violations:
            raise ProblemError(f"{what} is infeasible for {self.pattern}: {violations}; "
                               "repair it with problem.project(mask)")
        return mask

    def is_feasible(self, mask: torch.Tensor) -> bool:
        try:
            self.check_mask(mask)
        except ProblemError:
            return False
        return True

    def _count_violations(self, mask: torch.Tensor) -> str:
        if isinstance(self.pattern, PerRow):
            bad = (mask.sum(1) != self.pattern.keep).nonzero().flatten()
            if len(bad):
                return f"{len(bad)} rows do not keep exactly {self.pattern.keep} weights (first: row {bad[0].item()})"
            return ""
        groups = mask.reshape(self.rows, -1, self.pattern.m).sum(2)
        bad = (groups != self.pattern.n).sum().item()
        return f"{bad} groups of {self.pattern.m} do not keep exactly {self.pattern.n}" if bad else ""

    def project(self, mask: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The feasible mask nearest to `mask` (fewest flips); among equally near ones, keep the highest scores.

        `scores` defaults to Wanda's |w_j| sqrt(G_jj). Used to repair warm starts such as SparseGPT's
        layer-wise mask, whose rows have unequal sparsity.
        """
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(self.weight.shape):
            raise ProblemError(f"project() needs a mask of shape {tuple(self.weight.shape)}")
        scores = self.wanda_scores() if scores is None else scores.to(self.device)
        key = mask.to(self.device).long() * self.d + _ranks(scores)
        return mask_from_scores(key, self.pattern)

    def wanda_scores(self) -> torch.Tensor:
        """|w_j| * sqrt(G_jj): Wanda's importance score (||X_j|| up to a constant factor)."""
        return self.weight.abs() * self.gram.diagonal().clamp_min(0).sqrt()

    # ---- objective ---------------------------------------------------------------------------
    def objective(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-row error (w ⊙ ¬m)ᵀ G (w ⊙ ¬m) in float64, shape [rows]. Any bool mask of the right shape."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(self.weight.shape):
            raise ProblemError(f"objective() needs a bool mask of shape {tuple(self.weight.shape)} (True = keep)")
        return self.reconstruction_error(self.weight * mask.to(self.device))

    def reconstruction_error(self, new_weight: torch.Tensor) -> torch.Tensor:
        """Per-row (w - ŵ)ᵀ G (w - ŵ) in float64 for any replacement weight ŵ, e.g. after weight updates."""
        gram = self.gram.to(torch.float64)
        new_weight = new_weight.to(self.device)
        out = torch.empty(self.rows, dtype=torch.float64, device=self.device)
        for start in range(0, self.rows, _OBJECTIVE_CHUNK):
            stop = start + _OBJECTIVE_CHUNK
            change = self.weight[start:stop].to(torch.float64) - new_weight[start:stop].to(torch.float64)
            out[start:stop] = ((change @ gram) * change).sum(1)
        return out

    def total_objective(self, mask: torch.Tensor) -> float:
        return float(self.objective(mask).sum())


def _as_float_matrix(tensor, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(tensor)
    if tensor.ndim != 2:
        raise ProblemError(f"{what} must be a 2-D tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ProblemError(f"{what} must be floating point, got {tensor.dtype}")
    if 0 in tensor.shape:
        raise ProblemError(f"{what} is empty (shape {tuple(tensor.shape)})")
    return tensor.detach()


def _as_vector(tensor, d: int, device) -> torch.Tensor:
    tensor = torch.as_tensor(tensor).detach().to(device)
    if tensor.shape != (d,):
        raise ProblemError(f"input_mean must have shape ({d},), got {tuple(tensor.shape)}")
    _check_finite(tensor, "input_mean")
    return tensor


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise ProblemError(f"{what} has {bad} NaN or infinite entries: check the model weights and "
                           "calibration inputs (an overflow in half precision is a common cause)")


def _check_symmetric_psd(gram: torch.Tensor, full: bool) -> None:
    scale = gram.abs().max().item()
    if scale == 0:
        raise ProblemError("gram is all zeros: the calibration inputs never reached this layer")
    asym = (gram - gram.T).abs().max().item()
    if asym > 1e-5 * scale:
        raise ProblemError(f"gram is not symmetric (max |G - G^T| = {asym:.3g}, max |G| = {scale:.3g}): "
                           "pass G = X^T X, or symmetrise it with (G + G.T) / 2")
    diag = gram.diagonal()
    if diag.min().item() < -1e-6 * scale:
        raise ProblemError(f"gram has a negative diagonal entry ({diag.min().item():.3g}): a Gram matrix X^T X "
                           "is positive semidefinite")
    if full and gram.shape[0] <= _EIGEN_CHECK_MAX_D:
        eigenvalues = torch.linalg.eigvalsh(gram.to(torch.float64))
        if eigenvalues[0].item() < -1e-4 * max(eigenvalues[-1].item(), math.ulp(1.0)):
            raise ProblemError(f"gram is not positive semidefinite (smallest eigenvalue {eigenvalues[0].item():.3g}, "
                               f"largest {eigenvalues[-1].item():.3g}): pass G = X^T X")
