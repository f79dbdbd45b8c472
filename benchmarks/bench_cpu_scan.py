"""The CPU 1-swap scan (numba engine) against this machine's floor.

The floor: float32 FMA operations per second of all cores, measured with numba kernels of independent FMA
chains, over the 3 arithmetic operations each evaluated pair needs (multiply, FMA, min), as the GPU
benchmark counts. The scan evaluates every (pruned i, j) pair of a row, p x d; useful pairs are p x k.
Each shape is timed through `scan_per_row_numba` (terms, kernel and the passes that pick j and i), median
of repeats after a warm-up.

    python benchmarks/bench_cpu_scan.py --out benchmarks/results/bench_cpu_scan.json   # + .md beside it
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseswaps import PerRow, mask_from_scores  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402
from sparseswaps.solvers.swaps_cpu import scan_per_row_numba  # noqa: E402

OPERATIONS_PER_PAIR = 3
# SmolLM2-135M's layer shapes (rows x d), q/k/v stacked as the pipeline solves them
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def measured_fma_rate(repeats: int = 5) -> float:
    """float32 FMA operations per second over all threads numba uses."""
    from numba import get_num_threads, njit, prange

    @njit(parallel=True, fastmath=True)
    def fma_chains(values, iterations):   # pragma: no cover - compiled
        for block in prange(values.shape[0] // 64):
            chains = values[block * 64:(block + 1) * 64].copy()
            for _ in range(iterations):
                for k in range(64):
                    chains[k] = chains[k] * np.float32(0.999) + np.float32(0.001)
            values[block * 64:(block + 1) * 64] = chains

    values = np.random.default_rng(0).random(64 * 8 * get_num_threads(), dtype=np.float32)
    fma_chains(values, 10)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        fma_chains(values, 1_000_000)
        rates.append(values.size * 1_000_000 / (time.perf_counter() - started))
    return statistics.median(rates)


def time_scan(rows: int, d: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, d, generator=generator)
    gram = x.T @ x
    w = torch.randn(rows, d, generator=generator)
    pattern = PerRow(d // 2)
    mask = mask_from_scores(w.abs() * gram.diagonal().sqrt(), pattern)
    c = (w * ~mask).double() @ gram.double()
    scan_per_row_numba(w, mask, c, gram, pattern)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        scan_per_row_numba(w, mask, c, gram, pattern)
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    pruned = d - pattern.keep
    return {"rows": rows, "d": d, "seconds": median, "evaluated_pairs_per_s": rows * pruned * d / median,
            "useful_pairs_per_s": rows * pruned * pattern.keep / median}


def markdown(report: dict) -> str:
    floor = report["floor_pairs_per_s"]
    lines = [f"Floor: {report['fma_per_s'] / 1e9:.1f} G float32 FMA/s measured on {report['threads']} threads / "
             f"{OPERATIONS_PER_PAIR} = **{floor / 1e9:.1f} G evaluated pairs/s**.", "",
             "| rows x d (50%) | ms per scan | G evaluated pairs/s | share of floor | G useful pairs/s |",
             "|---|---:|---:|---:|---:|"]
    for row in report["shapes"]:
        lines.append(f"| {row['rows']}x{row['d']} | {row['seconds'] * 1e3:.1f} | "
                     f"{row['evaluated_pairs_per_s'] / 1e9:.1f} | {row['evaluated_pairs_per_s'] / floor:.0%} | "
                     f"{row['useful_pairs_per_s'] / 1e9:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    from numba import get_num_threads

    rate = measured_fma_rate()
    report = {"fma_per_s": rate, "threads": get_num_threads(), "operations_per_pair": OPERATIONS_PER_PAIR,
              "floor_pairs_per_s": rate / OPERATIONS_PER_PAIR,
              "shapes": [time_scan(rows, d, args.repeats) for rows, d in SHAPES], "environment": environment()}
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
