"""DSnoT, dynamic sparse no training (Zhang et al., ICLR 2024): the training-free refinement peer.

Each row tracks the signed first-moment error r = Σ_{pruned j} w_j E[x_j] (times tokens per sample, as in
the reference code) and runs regrow/prune cycles: regrow the pruned weight whose contribution (scaled by
1/Var[x_j]) best cancels r, prune the kept weight of the opposite sign with the lowest Wanda score (for
N:M: the lowest-Wanda kept weight of the regrown weight's group). A row stops when |r| <= threshold,
after `max_cycles` cycles (50), or when its candidates run out.

As in the reference code (its default `--skip_layer mlp`), layers whose name has a component `mlp` keep
their warm start untouched: DSnoT refines only the other layers unless told `skip_layer="no_skip"`.

Differences from the reference code: Var[x_j] is the variance over all calibration tokens (the reference
averages per-sample variances), and a row whose candidate lists are exhausted stops instead of reusing
entries. Where neither applies (one calibration sample, candidates left) the masks are the reference's:
tests/test_parity.py runs a port of its prune_DSnoT beside this, unstructured and N:M.
"""
from __future__ import annotations

import torch

from sparseswaps import NM, MaskProblem, ProblemError, Solution, Solver, Termination, mask_from_scores, register


def _first_moment_metric(problem: MaskProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_j * E[x_j] * tokens per sample, Var[x_j]) from the problem's input statistics."""
    if problem.input_mean is None or not problem.num_tokens:
        raise ProblemError("dsnot needs the mean of the layer's inputs: build the problem with "
                           "MaskProblem.from_inputs(...) or pass input_mean= and num_tokens=")
    mean = problem.input_mean.to(torch.float64)
    tokens_per_sample = problem.num_tokens / problem.num_samples if problem.num_samples else 1.0
    variance = (problem.gram.diagonal().to(torch.float64) / problem.num_tokens - mean ** 2).clamp_min(1e-12)
    return problem.weight.to(torch.float64) * mean * tokens_per_sample, variance


def _take(order: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return torch.gather(order, 1, position.clamp(0, order.shape[1] - 1).unsqueeze(1)).squeeze(1)


def _regrow_order(metric, variance, pruned, power) -> tuple[torch.Tensor, int]:
    """Initially pruned entries of each row, by metric / Var^power ascending."""
    key = torch.where(pruned, metric / variance ** power, torch.inf)
    return torch.sort(key, dim=1, stable=True).indices, int(pruned[0].sum())


def _refine_per_row(problem, metric, variance, mask, wanda, max_cycles, threshold, power, same_sign):
    rows, d = mask.shape
    index = torch.arange(rows, device=mask.device)
    error = (metric * ~mask).sum(1)
    initial_sign = torch.sign(error)
    regrow_order, pruned_count = _regrow_order(metric, variance, ~mask, power)
    # Kept entries: negative contributions by Wanda score ascending, then positive ones descending.
    wanda_rank = torch.sort(torch.sort(wanda, dim=1, stable=True).indices, dim=1).indices
    prune_key = torch.where(metric < 0, wanda_rank, 2 * d - wanda_rank)
    prune_order = torch.sort(torch.where(mask, prune_key, 4 * d), dim=1, stable=True).indices
    kept_count = d - pruned_count
    low_r, high_r = torch.zeros_like(index), torch.full_like(index, pruned_count - 1)
    low_p, high_p = torch.zeros_like(index), torch.full_like(index, kept_count - 1)
    active = torch.ones(rows, dtype=torch.bool, device=mask.device)
    cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        from_top_r, from_top_p = error > 0, error < 0
        regrow = _take(regrow_order, torch.where(from_top_r, high_r, low_r))
        prune = _take(prune_order, torch.where(from_top_p, high_p, low_p))
        valid = (low_r <= high_r) & (low_p <= high_p)
        high_r, low_r = high_r - from_top_r.long(), low_r + (~from_top_r).long()
        high_p, low_p = high_p - from_top_p.long(), low_p + (~from_top_p).long()
        after = error + metric[index, prune] - metric[index, regrow]
        active &= valid & (error.abs() > threshold)
        if same_sign:
            active &= torch.sign(after) == initial_sign
        mask[index[active], regrow[active]] = True
        mask[index[active], prune[active]] = False
        error = torch.where(active, after, error)
    return mask, cycles


def _refine_nm(problem, metric, variance, mask, wanda, max_cycles, threshold, power, pattern: NM):
    rows, d = mask.shape
    index = torch.arange(rows, device=mask.device)
    error = (metric * ~mask).sum(1)
    initial_sign = torch.sign(error)
    regrow_order, pruned_count = _regrow_order(metric, variance, ~mask, power)
    # Only initially kept weights may be pruned, lowest Wanda score first; each at most once.
    prune_score = torch.where(mask, wanda, torch.inf)
    low_r, high_r = torch.zeros_like(index), torch.full_like(index, pruned_count - 1)
    offsets = torch.arange(pattern.m, device=mask.device)
    active = torch.ones(rows, dtype=torch.bool, device=mask.device)
    cycles = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        from_top = error > 0
        regrow = _take(regrow_order, torch.where(from_top, high_r, low_r))
        valid = low_r <= high_r
        high_r, low_r = high_r - from_top.long(), low_r + (~from_top).long()
        group = (regrow - regrow % pattern.m).unsqueeze(1) + offsets
        candidates = torch.gather(prune_score, 1, group)
        lowest, position = candidates.min(1)
        prune = group[index, position]
        after = error + metric[index, prune] - metric[index, regrow]
        active &= valid & torch.isfinite(lowest) & (error.abs() > threshold) & (torch.sign(after) == initial_sign)
        mask[index[active], regrow[active]] = True
        mask[index[active], prune[active]] = False
        prune_score[index[active], prune[active]] = torch.inf
        error = torch.where(active, after, error)
    return mask, cycles


@register("dsnot")
class DSnoTSolver(Solver):
    warm_start = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, max_cycles: int = 50,
              update_threshold: float = 0.1, pow_of_var_regrowing: float = 1.0, same_sign: bool = False,
              skip_layer: str = "mlp") -> Solution:
        wanda = problem.wanda_scores().to(torch.float64)
        mask = (warm_start if warm_start is not None else mask_from_scores(wanda, problem.pattern)).clone()
        if skip_layer != "no_skip" and skip_layer in problem.name.split("."):
            return Solution(mask, Termination.HEURISTIC, extra={"cycles": 0, "skipped": True})
        metric, variance = _first_moment_metric(problem)
        if isinstance(problem.pattern, NM):
            mask, cycles = _refine_nm(problem, metric, variance, mask, wanda, max_cycles, update_threshold,
                                      pow_of_var_regrowing, problem.pattern)
        else:
            mask, cycles = _refine_per_row(problem, metric, variance, mask, wanda, max_cycles, update_threshold,
                                           pow_of_var_regrowing, same_sign)
        return Solution(mask, Termination.HEURISTIC, extra={"cycles": cycles})
