"""pytest-benchmark entries for the CPU 1-swap scan, so regressions show in CI's output (no timed asserts)."""
import pytest
import torch

from sparseswaps import NM, PerRow, mask_from_scores
from sparseswaps.solvers import swaps_cpu
from sparseswaps.solvers.swaps import pairs_per_row, scan_nm, scan_per_row

SHAPES = [("torch 64x576 50%", 64, 576, PerRow(288), scan_per_row),
          ("torch 64x576 2:4", 64, 576, NM(2, 4), scan_nm),
          ("torch 16x1536 50%", 16, 1536, PerRow(768), scan_per_row)]
if swaps_cpu.AVAILABLE:   # the default CPU engine
    SHAPES += [("numba 576x576 50%", 576, 576, PerRow(288), swaps_cpu.scan_per_row_numba),
               ("numba 576x1536 50%", 576, 1536, PerRow(768), swaps_cpu.scan_per_row_numba)]


@pytest.mark.parametrize("label, rows, d, pattern, scan", SHAPES, ids=[s[0] for s in SHAPES])
def test_scan_throughput(benchmark, label, rows, d, pattern, scan):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, d, generator=generator)
    gram = x.T @ x
    w = torch.randn(rows, d, generator=generator)
    mask = mask_from_scores(w.abs() * gram.diagonal().sqrt(), pattern)
    c = (w * ~mask) @ gram
    best, i, j = benchmark(scan, w, mask, c, gram, pattern)
    assert bool((~mask[torch.arange(rows), i]).all()) and bool(mask[torch.arange(rows), j].all())
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["pairs_per_second"] = rows * pairs_per_row(d, pattern) / seconds
