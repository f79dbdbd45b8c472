"""Experiment: where the time of one float16 filtering scan goes (CUDA kernels, torch.profiler).

One 4096 x 4096 synthetic layer (bench_swaps.synthetic_layer), Wanda's 50% mask; the float32 scan for
comparison. Prints the CUDA time per kernel name over 20 scans of each kind.

    python benchmarks/experiments/filter_profile.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_swaps import filtered_scan, synthetic_layer  # noqa: E402
from sparseswaps import MaskProblem, mask_from_scores  # noqa: E402
from sparseswaps.solvers.swaps_triton import scan_per_row_triton  # noqa: E402


def main(rows: int = 4096, d: int = 4096, repeats: int = 20) -> None:
    weight, gram = synthetic_layer(rows, d, seed=0)
    problem = MaskProblem(weight, gram, sparsity=0.5, check_psd=False)
    mask = mask_from_scores(problem.wanda_scores(), problem.pattern)
    c = (weight * ~mask) @ gram
    for scan in (scan_per_row_triton, filtered_scan):
        scan(weight, mask, c, gram, problem.pattern)        # compile and autotune first
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                scan(weight, mask, c, gram, problem.pattern)
            torch.cuda.synchronize()
        print(f"== {scan.__name__}: CUDA ms per scan, by kernel")
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events) / repeats / 1e3
        for event in events[:14]:
            print(f"{event.device_time_total / repeats / 1e3:8.3f}  {event.key[:110]}")
        print(f"{total:8.3f}  total")


if __name__ == "__main__":
    main()
