"""What building `refit_swaps`' state costs at an 8B down_proj width, on CUDA, step by step and by alternative.

`_Batch` built H = (G_SS)⁻¹ by a Cholesky factor and `cholesky_inverse` (until 785c69b, which on CUDA takes the
triangular route this script measured), then U = H G_SN. With a capped
number of swaps per row the build can cost more than the swaps (tune_refit_scan.py), so each step is timed
on one batch of synthetic Llama-3-8B down_proj rows (bench_swaps.synthetic_layer, Wanda's mask at 60%),
with the alternatives for H (LU inverse; the triangular inverse of the factor and one product) and for U
(`cholesky_solve`), each checked against the current result.

    python benchmarks/experiments/profile_refit_build.py --rows 10 --out build.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_refit_swaps import line_report, synchronized as timed, synthetic_batch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    say = line_report(args.out)

    _, gram, keep = synthetic_batch(args.rows, args.width)
    kept = keep.nonzero()[:, 1].view(args.rows, -1)
    pruned = (~keep).nonzero()[:, 1].view(args.rows, -1)
    k = kept.shape[1]
    say(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.rows} rows x {args.width}, k {k}, "
        f"p {pruned.shape[1]}; seconds for the batch (the first call of each includes its warm-up)")
    for attempt in range(2):
        system, gather_s = timed(lambda: gram[kept[:, :, None], kept[:, None, :]])
        cross, cross_s = timed(lambda: gram[kept[:, :, None], pruned[:, None, :]])
        factor, cholesky_s = timed(lambda: torch.linalg.cholesky(system))
        h, inverse_s = timed(lambda: torch.cholesky_inverse(factor))
        u, product_s = timed(lambda: h @ cross)
        say(f"run {attempt}: gather G_SS {gather_s:.3f}, G_SN {cross_s:.3f}, cholesky {cholesky_s:.3f}, "
            f"cholesky_inverse {inverse_s:.3f}, H G_SN {product_s:.3f}")
        lu_h, lu_s = timed(lambda: torch.linalg.inv(system))
        eye = torch.eye(k, dtype=torch.float64, device=system.device)
        triangular, triangular_s = timed(lambda: torch.linalg.solve_triangular(factor, eye, upper=False))
        tri_h, gram_s = timed(lambda: triangular.mT @ triangular)
        solved_u, solve_s = timed(lambda: torch.cholesky_solve(cross, factor))
        scale = h.abs().max()
        say(f"run {attempt}: linalg.inv {lu_s:.3f} (max |ΔH| / max |H| {float((lu_h - h).abs().max() / scale):.1e}); "
            f"solve_triangular(L, I) {triangular_s:.3f} + L⁻ᵀL⁻¹ {gram_s:.3f} "
            f"({float((tri_h - h).abs().max() / scale):.1e}); cholesky_solve for U {solve_s:.3f} "
            f"({float((solved_u - u).abs().max() / u.abs().max()):.1e})")


if __name__ == "__main__":
    main()
