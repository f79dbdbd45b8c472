"""Experiment (negative result): can the next best 1-swap be certified without a new full scan?

After a full scan every kept j has low_j = min over pruned i of (a_i - 2 w_i w_j G_ij). A swap (i*, j*)
changes every a_i by δa_i, so afterwards low_j >= min(low_j + min_i δa_i, the new term of i = j*). With
these lower bounds, the K smallest candidates are recomputed exactly (one column of G each); if the best
of them is at most the (K+1)-th bound, it is provably the best swap and no scan is needed. Otherwise a
full scan runs. The swap sequence must equal plain best-improvement's; the figure of merit is full scans
per swap (plain best-improvement: 1).

    python benchmarks/experiments/lazy_certification.py --out benchmarks/results/lazy_certification.json

Real SmolLM2-135M layers (Gram over 16 x 512 C4 tokens of the dense model), 50% per row, float64 torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparseswaps import MaskProblem, mask_from_scores  # noqa: E402
from sparseswaps.instances import layer_grams  # noqa: E402
from sparseswaps.models import load_model  # noqa: E402
from sparseswaps.solvers.swaps import masked_swap_terms  # noqa: E402

LAYERS = [f"model.layers.{b}.{kind}" for b in (2, 15) for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]


def full_low(w, mask, c, gram):
    """Exact low[r, j] for every j (materialises [rows, d, d]; fine at these sizes)."""
    a, _ = masked_swap_terms(w, mask, c, gram)
    return (a.unsqueeze(2) - 2 * (w.unsqueeze(2) * gram) * w.unsqueeze(1)).min(1).values


def column_low(w, mask, c, gram, j):
    """Exact low[r, j_r] for one j per row, and the i reaching it."""
    a, _ = masked_swap_terms(w, mask, c, gram)
    rows = torch.arange(len(j))
    return (a - 2 * w * gram[:, j].T * w[rows, j].unsqueeze(1)).min(1)


def apply(w, mask, c, gram, rows, i, j):
    mask[rows, i] = True
    mask[rows, j] = False
    c[rows] += w[rows, j, None] * gram[j] - w[rows, i, None] * gram[i]


def best_improvement(w, mask, gram, iterations):
    """Plain best-improvement: one full scan per swap. Returns the swap sequence."""
    c = (w * ~mask) @ gram
    active = torch.ones(len(w), dtype=torch.bool)
    sequence = []
    for _ in range(iterations):
        _, prune = masked_swap_terms(w, mask, c, gram)
        best, j = (prune + full_low(w, mask, c, gram)).min(1)
        active &= best < 0
        if not active.any():
            break
        i = column_low(w, mask, c, gram, j).indices
        rows = active.nonzero().flatten()
        sequence.append((rows.tolist(), i[rows].tolist(), j[rows].tolist()))
        apply(w, mask, c, gram, rows, i[rows], j[rows])
    return sequence


def lazy(w, mask, gram, iterations, candidates):
    """Best-improvement that rescans only when the bounds cannot certify the best swap."""
    everyone = torch.arange(len(w))
    c = (w * ~mask) @ gram
    low = full_low(w, mask, c, gram)
    scans = len(w)
    active = torch.ones(len(w), dtype=torch.bool)
    sequence = []
    for _ in range(iterations):
        a, prune = masked_swap_terms(w, mask, c, gram)
        top = (prune + low).topk(candidates + 1, largest=False)
        exact = torch.stack([prune[everyone, top.indices[:, k]] + column_low(w, mask, c, gram, top.indices[:, k]).values
                             for k in range(candidates)], 1)
        best, position = exact.min(1)
        j = top.indices[everyone, position]
        rescan = active & ~(best <= top.values[:, candidates])
        if rescan.any():
            low[rescan] = full_low(w[rescan], mask[rescan], c[rescan], gram)
            scans += int(rescan.sum())
            best[rescan], j[rescan] = (prune[rescan] + low[rescan]).min(1)
        active &= best < 0
        if not active.any():
            break
        i = column_low(w, mask, c, gram, j).indices
        rows = active.nonzero().flatten()
        i, j = i[rows], j[rows]
        sequence.append((rows.tolist(), i.tolist(), j.tolist()))
        apply(w, mask, c, gram, rows, i, j)
        # Carry the bounds over the swap: every pruned i moved by at least min δa; j is newly pruned.
        a_after, _ = masked_swap_terms(w, mask, c, gram)
        moved = torch.where(torch.isfinite(a_after) & torch.isfinite(a), a_after - a, torch.inf).min(1).values
        newly_pruned = a_after[rows, j].unsqueeze(1) - 2 * w[rows, j].unsqueeze(1) * gram[j] * w[rows]
        low[rows] = torch.minimum(low[rows] + moved[rows].unsqueeze(1), newly_pruned)
        low[rows, i] = column_low(w[rows], mask[rows], c[rows], gram, i).values   # i is kept now: exact
    return sequence, scans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=4, help="K: candidates recomputed exactly per step")
    args = parser.parse_args()
    model, tokenizer, info = load_model(None)
    grams, calibration = layer_grams(model, tokenizer, LAYERS, nsamples=16, seqlen=512, seed=0)
    modules = dict(model.named_modules())
    results = {"model": info, "calibration": calibration, "rows": args.rows, "iterations": args.iterations,
               "candidates": args.candidates, "layers": {}}
    for name in LAYERS:
        weight = modules[name].weight.data[: args.rows].double()
        gram = grams[name].double()
        problem = MaskProblem(weight, gram, 0.5, check_psd=False)
        start = mask_from_scores(problem.wanda_scores(), problem.pattern)
        plain = best_improvement(weight, start.clone(), gram, args.iterations)
        sequence, scans = lazy(weight, start.clone(), gram, args.iterations, args.candidates)
        swaps = sum(len(rows) for rows, _, _ in sequence)
        results["layers"][name] = {"swaps": swaps, "full_scans": scans, "scans_per_swap": scans / max(swaps, 1),
                                   "same_sequence_as_best_improvement": sequence == plain}
        print(name, results["layers"][name], flush=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
