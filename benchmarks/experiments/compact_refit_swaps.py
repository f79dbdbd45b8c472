"""Would `refit_swaps` gain from keeping its state only on the kept x kept and kept x pruned blocks?

The solver keeps H = (G_SS + λI)⁻¹ and U = H G_SN in the full d x d index space per row (16 d² bytes),
although H lives on S x S and the scan reads U only on S x N. With k kept of d, the blocks take
8 (k² + k (d - k)) bytes, a quarter of that at 50%, and a swap's rank-one updates move as much less memory.
`CompactBatch` is that layout: slot a of the kept list and slot b of the pruned list trade their indices
in a swap (same bordered-inverse formulas as solvers/refit_swaps.py). This script checks that it takes the
solver's swaps on real layers and times both in this process, alternating (the fastest of --repeat runs).

    python benchmarks/experiments/compact_refit_swaps.py --real-layers layers.safetensors --rows 192
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from refit_swaps_against_commit import real_layer_cases  # noqa: E402
from sparseswaps.solvers.refit_swaps import _RELATIVE_GAIN, refit_swap_rows  # noqa: E402


class CompactBatch:
    """A batch's re-fitted state on the kept slots [B, k] and pruned slots [B, p]: H [B, k, k], U [B, k, p],
    v [B, k], r and c [B, p], the error [B]."""

    def __init__(self, weight, gram, damped, keep):
        batch = len(weight)
        self.rows = torch.arange(batch)
        self.gram, self.damped = gram, damped
        self.kept = keep.nonzero()[:, 1].view(batch, -1)
        self.pruned = (~keep).nonzero()[:, 1].view(batch, -1)
        g = weight @ gram
        g_kept = g.gather(1, self.kept)
        system = damped[self.kept[:, :, None], self.kept[:, None, :]]
        self.h = torch.cholesky_inverse(torch.linalg.cholesky(system))
        self.v = (self.h @ g_kept.unsqueeze(2)).squeeze(2)
        cross = gram[self.kept[:, :, None], self.pruned[:, None, :]]                 # G_SN
        self.u = self.h @ cross
        self.r = g.gather(1, self.pruned) - (self.v.unsqueeze(1) @ cross).squeeze(1)
        self.c = damped.diagonal()[self.pruned] - (cross * self.u).sum(1)
        self.error = (weight * g).sum(1) - (g_kept * self.v).sum(1)

    def best_swaps(self, group: int | None, scale: float):
        """(best Δ, kept slot a, pruned slot b) per row; ties go to the smallest a, then b."""
        diagonal = self.h.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(self.h.dtype).tiny)
        ratio = self.v / diagonal
        numerator = self.r[:, None, :] + self.u * ratio[:, :, None]
        denominator = self.c[:, None, :] + self.u * self.u / diagonal[:, :, None]
        gain = torch.where(denominator > 1e-12 * scale, numerator * numerator / denominator.clamp_min(1e-300), 0.0)
        delta = (self.v * ratio)[:, :, None] - gain
        if group is not None:
            delta = torch.where(self.kept[:, :, None] // group == self.pruned[:, None, :] // group, delta, torch.inf)
        flat = delta.flatten(1)
        at = flat.argmin(1, keepdim=True)
        width = self.pruned.shape[1]
        return flat.gather(1, at).squeeze(1), (at // width).squeeze(1), (at % width).squeeze(1)

    def select(self, going_on):
        for name in ("kept", "pruned", "h", "v", "u", "r", "c", "error"):
            setattr(self, name, getattr(self, name)[going_on])
        self.rows = torch.arange(len(self.error))

    def swap(self, a, b, delta):
        """Drop kept slot a, add pruned slot b: the dropped index takes slot b, the added one slot a."""
        rows = self.rows
        i, j = self.kept[rows, a], self.pruned[rows, b]
        # drop i
        h_i = self.h[rows, :, a]
        h_ii = h_i[rows, a][:, None]
        v_i, u_i = self.v[rows, a][:, None], self.u[rows, a, :]
        self.h.baddbmm_(h_i[:, :, None], (h_i / h_ii)[:, None, :], alpha=-1)
        self.v -= h_i * (v_i / h_ii)
        self.u.baddbmm_(h_i[:, :, None], (u_i / h_ii)[:, None, :], alpha=-1)
        self.c += u_i * u_i / h_ii
        self.r += u_i * (v_i / h_ii)
        self.h[rows, a, :], self.h[rows, :, a], self.u[rows, a, :], self.v[rows, a] = 0, 0, 0, 0
        h_i[rows, a] = 0
        # j leaves the pruned slot b to i
        u_j, c_j, r_j = self.u[rows, :, b], self.c[rows, b][:, None], self.r[rows, b][:, None]
        self.u[rows, :, b] = -h_i / h_ii
        self.c[rows, b], self.r[rows, b] = 1 / h_ii[:, 0], v_i[:, 0] / h_ii[:, 0]
        self.pruned[rows, b] = i
        # add j in kept slot a
        spread = torch.zeros(len(rows), len(self.gram), dtype=u_j.dtype).scatter_(1, self.kept, u_j)
        t = self.damped[j].gather(1, self.pruned) - (spread @ self.gram).gather(1, self.pruned)
        self.h.baddbmm_(u_j[:, :, None], (u_j / c_j)[:, None, :])
        self.h[rows, :, a] = -u_j / c_j
        self.h[rows, a, :] = -u_j / c_j
        self.h[rows, a, a] = 1 / c_j[:, 0]
        self.v -= u_j * (r_j / c_j)
        self.v[rows, a] = r_j[:, 0] / c_j[:, 0]
        self.u.baddbmm_(u_j[:, :, None], (t / c_j)[:, None, :], alpha=-1)
        self.u[rows, a, :] = t / c_j
        self.c -= t * t / c_j
        self.r -= t * (r_j / c_j)
        self.kept[rows, a] = j
        self.error += delta


def compact_refit_swap_rows(weight, gram, keep, max_iters: int, group: int | None, damping: float):
    """(mask, swaps per row) of every row in one batch, float64, the solver's stopping rule."""
    gram = gram.to(torch.float64)
    damped = gram + damping * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    scale = float(gram.diagonal().max())
    weight = weight.to(torch.float64)
    batch = CompactBatch(weight, gram, damped, keep)
    ids, mask = torch.arange(len(weight)), keep.clone()
    swaps = torch.zeros(len(weight), dtype=torch.long)
    energy = (weight * (weight @ gram)).sum(1)
    for _ in range(max_iters):
        best, a, b = batch.best_swaps(group, scale)
        improving = best < -_RELATIVE_GAIN * torch.maximum(batch.error, _RELATIVE_GAIN * energy[ids])
        mask[ids[~improving]] = kept_mask(batch.kept[~improving], keep.shape[1])
        if not bool(improving.any()):
            return mask, swaps
        if not bool(improving.all()):
            batch.select(improving)
            ids, best, a, b = ids[improving], best[improving], a[improving], b[improving]
        batch.swap(a, b, best)
        swaps[ids] += 1
    mask[ids] = kept_mask(batch.kept, keep.shape[1])
    return mask, swaps


def kept_mask(kept: torch.Tensor, d: int) -> torch.Tensor:
    return torch.zeros(len(kept), d, dtype=torch.bool).scatter_(1, kept, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-layers", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--targets", default="0.5,0.6,2:4")
    parser.add_argument("--max-iters", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each layout, alternating; the fastest counts")
    args = parser.parse_args()
    for name, target, problem, start, group in real_layer_cases(args.real_layers, args.rows, args.targets):
        runs = {"full": lambda: refit_swap_rows(problem.weight, problem.gram, start, args.max_iters, group, 1e-6,
                                                len(start)),
                "compact": lambda: compact_refit_swap_rows(problem.weight, problem.gram, start, args.max_iters,
                                                           group, 1e-6)}
        seconds, results = {"full": [], "compact": []}, {}
        for _ in range(args.repeat):
            for label, run in runs.items():
                began = time.perf_counter()
                results[label] = run()
                seconds[label].append(time.perf_counter() - began)
        full, compact = results["full"], results["compact"]
        print(f"{name} {target}: same masks {torch.equal(full[0], compact[0])}, same swaps per row "
              f"{torch.equal(full[1], compact[1])}, {int(full[1].sum())} swaps, fastest of {args.repeat}: "
              f"full {min(seconds['full']):.2f} s, compact {min(seconds['compact']):.2f} s", flush=True)


if __name__ == "__main__":
    main()
