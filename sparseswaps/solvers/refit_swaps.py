"""`refit_swaps`: 1-swaps scored on the re-fitted objective (masks and weights together).

SparseSwaps scores a swap by the error of w ⊙ m. Here a row's error is the least-squares error of its kept
set S, E(S) = wᵀGw - g_Sᵀ v with g = G w and v = H g_S, H = (G_SS)⁻¹, and a swap (drop i ∈ S, add j ∉ S)
is scored exactly by the two rank-one formulas
    dropping i:          E rises by v_i² / H_ii,
    then adding j:       E falls by (r_j + U_ij v_i / H_ii)² / (G_jj - q_j + U_ij² / H_ii),
with r = g_N - G_NS v (what j would still explain), U = H G_SN and q_j = G_jS H G_Sj. Every iteration each
row takes its best swap while it lowers E by more than a relative 1e-12; the result carries the
least-squares weights of the final mask.

`refit_swap_row` is that, row by row, re-solving the kept system at every swap (O(k² (d - k)) per scan):
the reference. The solver runs `refit_swap_rows`: batches of rows in float64 on the problem's device, the
state kept on the kept and pruned slots (H on S x S, U on S x N: k d entries per row) and updated in place
after each swap by the bordered-inverse formulas, so a scan and an update cost O(k d) per row. On CUDA the
scan is one fused Triton kernel (refit_triton.py), on the CPU one numba loop (refit_cpu.py) where numba is
installed. It takes the reference's swaps (tests/test_refit.py).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from sparseswaps import NM, MaskProblem, Solution, Solver, Termination, mask_from_scores, register
from sparseswaps.registry import SolverError

from . import refit_cpu, refit_triton
from .refit import refit_weights, with_diagonal_damping

_RELATIVE_GAIN = 1e-12
ENGINES = ("auto", "torch", "triton", "numba")


def _kept_system(gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """H = (G_SS)⁻¹, a dead input (zero row and column) standing alone with H_ii = 1 so that the swap formulas
    stay exact for it; by least squares, so a singular kept block still gives a minimiser."""
    system = gram[kept][:, kept]
    system.diagonal().masked_fill_(system.diagonal() == 0, 1.0)
    return torch.linalg.pinv(system, hermitian=True)


def swap_gains(w, gram, keep, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(Δ [k, p] for dropping kept[a] and adding pruned[b], kept, pruned, current error E) of one row."""
    g = gram @ w
    kept, pruned = keep.nonzero().flatten(), (~keep).nonzero().flatten()
    h = _kept_system(gram, kept)
    v = h @ g[kept]
    error = float(w @ g - g[kept] @ v)
    cross = gram[kept][:, pruned]                                   # G_SN
    u = h @ cross                                                   # [k, p]
    q = (cross * u).sum(0)                                          # G_jS H G_Sj
    r = g[pruned] - cross.T @ v
    diagonal = h.diagonal().clamp_min(torch.finfo(h.dtype).tiny)
    numerator = r[None, :] + u * (v / diagonal)[:, None]
    denominator = (gram[pruned, pruned] - q)[None, :] + u * u / diagonal[:, None]
    scale = gram.diagonal().max().clamp_min(torch.finfo(h.dtype).tiny)
    gain = torch.where(denominator > 1e-12 * scale, numerator * numerator / denominator.clamp_min(1e-300), 0.0)
    delta = (v * v / diagonal)[:, None] - gain
    if group is not None:
        delta = torch.where(kept[:, None] // group == pruned[None, :] // group, delta, torch.inf)
    return delta, kept, pruned, error


def refit_swap_row(w, gram, keep, max_iters: int, group: int | None = None) -> tuple[torch.Tensor, int, bool]:
    """(mask, swaps applied, whether a local optimum was reached) of one row, float64."""
    keep = keep.clone()
    for swaps in range(max_iters):
        delta, kept, pruned, error = swap_gains(w, gram, keep, group)
        floor = _RELATIVE_GAIN * max(error, _RELATIVE_GAIN * float(w @ gram @ w))
        if not delta.min() < -floor:
            return keep, swaps, True
        a, b = divmod(int(delta.argmin()), len(pruned))
        keep[kept[a]], keep[pruned[b]] = False, True
    return keep, max_iters, False


class _Batch:
    """The re-fitted state of a batch of rows [B] on their kept slots [B, k] and pruned slots [B, p] (`kept`
    and `pruned` name each slot's input), updated by rank-one steps after each swap instead of re-solved:
    H = (G_SS + λI)⁻¹ [B, k, k], v = H g_S [B, k], U = H G_SN [B, k, p], r_l = g_l - G_lS v and
    C_l = G_ll + λ - G_lS H G_Sl [B, p], and E [B]. A swap drops the input of kept slot a and adds that of
    pruned slot b, which trade inputs; the drop (H_ii, h = H[:, a]) and the add (u = U[:, b], c = C_b,
    t_l = G_jl - uᵀ G_Sl) follow the bordered-inverse formulas: O(k d) per row and swap, where re-solving
    costs O(k³), on a state of k d entries where the full index space needs 2 d². Under an N:M pattern each
    group's inputs hold consecutive slots, kept and pruned alike (a swap stays in its group), so the scan reads
    only the groups' diagonal blocks of U."""

    def __init__(self, w, gram, damping: float, keep, group: int | None, scan: str = "torch"):
        batch, d = keep.shape
        self.scan, self.d = scan, d
        self.rows = torch.arange(batch, device=w.device)
        self.gram = gram
        self.kept = keep.nonzero()[:, 1].view(batch, -1)                   # ascending in each row
        self.pruned = (~keep).nonzero()[:, 1].view(batch, -1)
        self.groups = d // group if group else 1
        g = w @ gram
        g_kept = g.gather(1, self.kept)
        self.h = _kept_inverse(gram, self.kept, damping)
        self.v = (self.h @ g_kept.unsqueeze(2)).squeeze(2)
        cross = gram[self.kept[:, :, None], self.pruned[:, None, :]]     # G_SN
        self.u = self.h @ cross
        self.r = g.gather(1, self.pruned) - (self.v.unsqueeze(1) @ cross).squeeze(1)
        self.c = (gram.diagonal()[self.pruned] + damping) - (cross * self.u).sum(1)
        self.error = (w * g).sum(1) - (g_kept * self.v).sum(1)
        self.ids = self.rows.clone()

    def keep(self) -> torch.Tensor:
        """The batch's masks [B, d]."""
        return torch.zeros(len(self.kept), self.d, dtype=torch.bool, device=self.kept.device).scatter_(1, self.kept, True)

    def best_swaps(self, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(best Δ, kept slot a, pruned slot b) per row over every swap (one N:M group); ties go to the smallest
        dropped input, then the smallest added one, whatever slots they hold. The "triton" and "numba" scans
        compute the same in one pass (refit_triton.py on CUDA, refit_cpu.py on the CPU)."""
        diagonal = self.h.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(self.h.dtype).tiny)
        ratio = self.v / diagonal
        if self.scan != "torch":
            kernel = refit_triton if self.scan == "triton" else refit_cpu
            best, key = kernel.best_swaps(self.u, ratio, diagonal, self.v * ratio, self.r, self.c, self.kept,
                                          self.pruned, self.d, self.groups, 1e-12 * scale)
        else:
            best, key = self._scan(ratio, diagonal, scale)
        i, j = key // self.d, key % self.d
        return best, _slot_of(self.kept, i), _slot_of(self.pruned, j)

    def _scan(self, ratio, diagonal, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """(best Δ, its key i·d + j) per row, as [B, groups, k/groups, p/groups] blocks of the pairs."""
        batch, groups = len(self.kept), self.groups

        def blocks(slots):                                             # [B, k] -> [B, groups, k / groups]
            return slots.view(batch, groups, -1)

        u = self.u.view(batch, groups, self.u.shape[1] // groups, groups, -1).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        numerator = blocks(self.r)[:, :, None, :] + u * blocks(ratio)[:, :, :, None]
        denominator = blocks(self.c)[:, :, None, :] + u * u / blocks(diagonal)[:, :, :, None]
        gain = torch.where(denominator > 1e-12 * scale, numerator * numerator / denominator.clamp_min(1e-300), 0.0)
        delta = (blocks(self.v * ratio)[:, :, :, None] - gain).flatten(1)
        best = delta.min(1).values
        key = (blocks(self.kept)[:, :, :, None] * self.d + blocks(self.pruned)[:, :, None, :]).flatten(1)
        return best, torch.where(delta == best[:, None], key, self.d * self.d).min(1).values

    def select(self, going_on: torch.Tensor) -> None:
        for name in ("kept", "pruned", "h", "v", "u", "r", "c", "error", "ids"):
            setattr(self, name, getattr(self, name)[going_on])
        self.rows = torch.arange(len(self.ids), device=self.ids.device)

    def swap(self, a: torch.Tensor, b: torch.Tensor, delta: torch.Tensor) -> None:
        """Drop the input i of kept slot a and add the input j of pruned slot b in every row; they trade slots.
        Dropping i is a rank-one downdate of H and U, adding j a rank-one update; both go into one rank-two
        product each, so H and U, the state that a swap streams, are read and written once."""
        rows = self.rows
        i, j = self.kept[rows, a], self.pruned[rows, b]
        h_i = self.h[rows, :, a]                                           # [B, k]
        h_ii = h_i[rows, a][:, None]
        v_i, u_i = self.v[rows, a][:, None], self.u[rows, a, :]
        u_ib = u_i[rows, b][:, None]
        u_j = self.u[rows, :, b] - h_i * (u_ib / h_ii)                     # j's column once i is gone
        u_j[rows, a] = 0
        c_j = self.c[rows, b][:, None] + u_ib * u_ib / h_ii
        r_j = self.r[rows, b][:, None] + u_ib * (v_i / h_ii)
        self.pruned[rows, b] = i
        spread = torch.zeros(len(rows), self.d, dtype=u_j.dtype, device=u_j.device).scatter_(1, self.kept, u_j)
        t = (self.gram[j] - spread @ self.gram).gather(1, self.pruned)      # [B, p]; λ only on j's own entry
        left = torch.stack((h_i, u_j), 2)                                  # [B, k, 2]
        self.h.baddbmm_(left, torch.stack((-h_i / h_ii, u_j / c_j), 1))    # in place: no [B, k, k] temporary
        self.u.baddbmm_(left, torch.stack((-u_i / h_ii, -t / c_j), 1))
        self.v -= h_i * (v_i / h_ii)
        self.v -= u_j * (r_j / c_j)
        self.c += u_i * u_i / h_ii
        self.c -= t * t / c_j
        self.r += u_i * (v_i / h_ii)
        self.r -= t * (r_j / c_j)
        h_i[rows, a] = 0
        t_b = t[rows, b][:, None]
        self.u[rows, :, b] = -h_i / h_ii - u_j * (t_b / c_j)               # i's column as a pruned input
        self.c[rows, b] = (1 / h_ii - t_b * t_b / c_j)[:, 0]
        self.r[rows, b] = (v_i / h_ii - t_b * (r_j / c_j))[:, 0]
        self.h[rows, :, a] = -u_j / c_j                                    # j's row and column as a kept input
        self.h[rows, a, :] = -u_j / c_j
        self.h[rows, a, a] = 1 / c_j[:, 0]
        self.u[rows, a, :] = t / c_j
        self.v[rows, a] = (r_j / c_j)[:, 0]
        self.kept[rows, a] = j
        self.error += delta


def _kept_inverse(gram: torch.Tensor, kept: torch.Tensor, damping: float, triangular: bool | None = None) -> torch.Tensor:
    """H = (G_SS + λI)⁻¹ [B, k, k] for kept inputs [B, k] from the Cholesky factor L. On CUDA as L⁻ᵀ L⁻¹: a
    triangular solve and one product cost less than half of `cholesky_inverse` at 8B widths on an H200
    (results/profile_refit_build_h200.txt); on the CPU `cholesky_inverse` is the faster
    (results/refit_swaps_triangular_inverse_against_3bebb11_cpu.txt). A dead input (zero row and column of G)
    stands alone: H_ii = 1. `triangular` picks the route (default: by device)."""
    system = gram[kept[:, :, None], kept[:, None, :]]
    diagonal = system.diagonal(dim1=1, dim2=2).add_(damping)
    diagonal.masked_fill_(diagonal == 0, 1.0)
    factor = torch.linalg.cholesky(system)
    del system, diagonal                               # each [B, k, k] freed as soon as it is used
    if not (factor.is_cuda if triangular is None else triangular):
        return torch.cholesky_inverse(factor)
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
    del factor
    return inverse_factor.mT @ inverse_factor


def _slot_of(slots: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The slot holding `index` in each row (slot 0 where none does: a row with no swap left)."""
    return (slots == index[:, None]).int().argmax(1)


def _bytes_per_row(kept: int, pruned: int, groups: int, scan: str) -> int:
    """float64 bytes one row of a batch needs: H and U, and the larger of what building them and the torch
    scan ([k, p / groups] temporaries, about eight; the one-pass scans need none) hold besides."""
    state = 8 * (kept * kept + kept * pruned)
    setup = 8 * (2 * kept * kept + kept * pruned)
    scan = 64 * kept * pruned // groups if scan == "torch" else 0
    return state + max(setup, scan)


def refit_swap_rows(weight, gram, keep, max_iters: int, group: int | None = None, damping: float = 0.0,
                    batch_rows: int | None = None, engine: str = "auto", diagonal_damping: float = 0.0,
                    deadline: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, swaps per row, whether each row reached a local optimum): best 1-swaps on the re-fitted error
    for every row, batched, float64, on the inputs' device. λ = damping · mean(diag G) is added to the kept
    block (0: the exact least-squares error; it must then be positive definite), and the error is measured
    in G + diagonal_damping · diag(G) (refit.py). `engine`: the scan's implementation, "triton" (CUDA only),
    "numba" (CPU only), "torch" or "auto" (Triton on CUDA, numba on the CPU, where installed). Past
    `deadline` (time.monotonic()) no row swaps again: each keeps the swaps it took (every one is exact) and
    rows not reached keep the warm start."""
    scan = _scan_engine(engine, weight.device)
    gram = with_diagonal_damping(gram.to(torch.float64), diagonal_damping)
    damping = float(damping * gram.diagonal().mean())                # λ, added to the kept block's diagonal
    scale = float(gram.diagonal().max().clamp_min(torch.finfo(gram.dtype).tiny))
    weight, mask = weight.to(torch.float64), keep.clone()
    swaps = torch.zeros(len(weight), dtype=torch.long, device=weight.device)
    converged = torch.zeros(len(weight), dtype=torch.bool, device=weight.device)
    kept = _kept_per_row(keep, group)
    if kept in (0, keep.shape[1]):
        return mask, swaps, converged.fill_(True)                    # nothing to swap
    groups = keep.shape[1] // group if group else 1
    batch_rows = batch_rows or _batch_rows(_bytes_per_row(kept, keep.shape[1] - kept, groups, scan), weight.device)
    start = 0
    progress = tqdm(total=len(weight), desc="refit_swaps", unit="row", leave=False, disable=batch_rows >= len(weight))
    while start < len(weight) and not _past(deadline):
        rows = slice(start, start + batch_rows)
        try:
            _refine(_Batch(weight[rows], gram, damping, keep[rows], group, scan), weight[rows], gram, scale, max_iters,
                    mask[rows], swaps[rows], converged[rows], deadline)
        except torch.cuda.OutOfMemoryError:
            if batch_rows == 1:
                raise
            batch_rows = max(1, batch_rows // 2)       # the batch starts again from its warm start
            mask[rows], swaps[rows], converged[rows] = keep[rows], 0, False
            torch.cuda.empty_cache()
            continue
        progress.update(len(weight[rows]))
        start = rows.stop
    progress.close()
    if weight.is_cuda:
        torch.cuda.empty_cache()       # the batch state can reach 16 GiB: give it back to other work
    return mask, swaps, converged


def _kept_per_row(keep: torch.Tensor, group: int | None) -> int:
    """k, which every row (and under N:M every group of `group` inputs, in the same share) must keep alike."""
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise SolverError("refit_swaps needs the same number of kept inputs in every row of the warm start")
    if group is not None:
        if keep.shape[1] % group:
            raise SolverError(f"refit_swaps: the row width {keep.shape[1]} is not a multiple of the group {group}")
        per_group = keep.reshape(len(keep), -1, group).sum(2)
        if not bool((per_group == per_group[0, 0]).all()):
            raise SolverError("refit_swaps needs a warm start that keeps the same number in every N:M group")
    return int(counts[0]) if len(counts) else 0


def _refine(batch, weight, gram, scale, max_iters, mask, swaps, converged, deadline=None) -> None:
    """Best improving swap of every row of the batch until none improves by more than a relative 1e-12 (or
    the deadline passes)."""
    energy = (weight * (weight @ gram)).sum(1)
    for _ in range(max_iters):
        if _past(deadline):
            break
        best, a, b = batch.best_swaps(scale)
        floor = _RELATIVE_GAIN * torch.maximum(batch.error, _RELATIVE_GAIN * energy[batch.ids])
        improving = best < -floor
        converged[batch.ids[~improving]] = True
        mask[batch.ids[~improving]] = batch.keep()[~improving]
        if not bool(improving.any()):
            return
        if not bool(improving.all()):
            batch.select(improving)
            best, a, b = best[improving], a[improving], b[improving]
        batch.swap(a, b, best)
        swaps[batch.ids] += 1
    mask[batch.ids] = batch.keep()


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _scan_engine(engine: str, device: torch.device) -> str:
    """The scan that runs: "triton", "numba" or "torch"."""
    if engine not in ENGINES:
        raise SolverError(f"refit_swaps engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    runs = {"triton": device.type == "cuda" and refit_triton.AVAILABLE,
            "numba": device.type == "cpu" and refit_cpu.AVAILABLE, "torch": True}
    if engine == "triton" and not runs["triton"]:
        raise SolverError("refit_swaps engine 'triton' runs on CUDA devices and needs triton installed")
    if engine == "numba" and not runs["numba"]:
        raise SolverError("refit_swaps engine 'numba' runs on the CPU and needs numba (pip install 'sparseswaps[cpu]')")
    if engine == "auto":
        return next(name for name in ("triton", "numba", "torch") if runs[name])
    return engine


def _batch_rows(bytes_per_row: int, device: torch.device) -> int:
    """Rows whose state fits half the free GPU memory, at most 16 GiB (a scan streams the whole state, so
    larger batches gain little and would crowd out other processes), or 256 MiB on the CPU."""
    budget = min(torch.cuda.mem_get_info(device)[0] // 2, 16 << 30) if device.type == "cuda" else 256 << 20
    return max(1, budget // bytes_per_row)


@register("refit_swaps")
class RefitSwapsSolver(Solver):
    """Best 1-swaps on the re-fitted error from a warm start (default: Wanda's mask), all rows at once on the
    problem's device; returns the mask and its least-squares weights. Past `time_limit` seconds no row swaps
    again (termination time_limit; the weights are still re-fitted)."""

    warm_start = True
    weights = True

    def solve(self, problem: MaskProblem, *, warm_start=None, time_limit=None, seed=0, max_iters: int = 1000,
              damping: float = 0.0, batch_rows: int | None = None, engine: str = "auto",
              diagonal_damping: float = 0.0) -> Solution:
        if not isinstance(max_iters, int) or max_iters < 0:
            raise SolverError(f"refit_swaps needs a whole number max_iters >= 0, got {max_iters!r}")
        if not (damping >= 0 and diagonal_damping >= 0):
            raise SolverError(f"refit_swaps needs damping >= 0 and diagonal_damping >= 0, got {damping!r} and "
                              f"{diagonal_damping!r}")
        start = warm_start if warm_start is not None else mask_from_scores(problem.wanda_scores(), problem.pattern)
        group = problem.pattern.m if isinstance(problem.pattern, NM) else None
        deadline = None if time_limit is None else time.monotonic() + time_limit
        try:
            mask, swaps, converged = refit_swap_rows(problem.weight, problem.gram, start.to(problem.device),
                                                     max_iters, group, damping, batch_rows, engine,
                                                     diagonal_damping, deadline)
        except torch.linalg.LinAlgError as error:
            raise SolverError(f"refit_swaps: the kept block of G is singular for some row ({error}), e.g. two "
                              "kept inputs that are the same; set damping > 0 (λ = damping · mean diag G is added to it), "
                              "e.g. damping=1e-6") from error
        rows_converged = int(converged.sum())
        termination = (Termination.LOCAL_OPTIMUM if rows_converged == problem.rows else
                       Termination.TIME_LIMIT if _past(deadline) else Termination.ITERATION_LIMIT)
        weight = refit_weights(problem, mask, damping=damping, diagonal_damping=diagonal_damping)
        return Solution(mask, termination, weight=weight,
                        extra={"swaps": swaps.cpu(), "swaps_total": int(swaps.sum()), "converged": converged.cpu(),
                               "rows_converged": rows_converged},
                        message=f"{rows_converged} of {problem.rows} rows at a local optimum of the re-fitted error")
