"""The fused Triton scan of `refit_swaps` against the torch scan through whole refinements, on this CPU.

Runs under Triton's interpreter (no GPU needed): each case refines the same warm start (magnitude's mask, with a
dead input kept: tests/conftest.py) once with the fused scan and once with the torch scan, and the two must take the same swaps.
Triton 3.6's interpreter needs numpy < 2.3:

    python -m venv --system-site-packages /tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.6.0 "numpy<2.3"
    TRITON_INTERPRET=1 PYTHONPATH=. /tmp/tvenv/bin/python benchmarks/experiments/refit_triton_interpreted.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_problem, with_dead_input  # noqa: E402
from sparseswaps.solvers.refit_swaps import _Batch, _refine, refit_swap_rows  # noqa: E402


def main() -> None:
    same = True
    for spec, group in (({"sparsity": 0.6}, None), ({"pattern": "2:4"}, 4)):
        dead, keep = with_dead_input(make_problem("correlated", rows=6, d=32, seed=5, tokens=200, **spec)[0], 3)
        weight, gram = dead.weight.double(), dead.gram.double()
        mask, swaps = keep.clone(), torch.zeros(len(keep), dtype=torch.long)
        converged = torch.zeros(len(keep), dtype=torch.bool)
        _refine(_Batch(weight, gram, 0.0, keep, group, scan="triton"), weight, gram, float(gram.diagonal().max()), 1000,
                mask, swaps, converged)
        want_mask, want_swaps, _ = refit_swap_rows(weight, gram, keep, 1000, group, engine="torch")
        case = torch.equal(mask, want_mask) and torch.equal(swaps, want_swaps)
        same &= case
        print(f"{spec}: fused and torch scans take the same swaps: {case} ({int(swaps.sum())} swaps)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
