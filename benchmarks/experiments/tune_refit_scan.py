"""The tile of `refit_swaps`' fused scan (refit_triton.py) at 8B widths, on CUDA.

For synthetic Llama-3-8B rows (bench_swaps.synthetic_layer, Wanda's mask at 60%), every tile (kept slots x
pruned slots per program, warps) must give the default tile's (Δ, key) exactly; the script times each
(triton.testing.do_bench, median) and then refines one batch of down_proj rows for `--swaps` swaps with the
default tile and with the fastest, in the same process, to measure what the scan's speed buys a whole swap.

    python benchmarks/experiments/tune_refit_scan.py --out tune.txt
"""
from __future__ import annotations

import argparse
import itertools
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_refit_swaps import line_report, synchronized, synthetic_batch  # noqa: E402
from sparseswaps.solvers import refit_triton  # noqa: E402
from sparseswaps.solvers.refit_swaps import _Batch, _refine  # noqa: E402

TILES = [dict(block_i=i, block_j=j, num_warps=w) for i, j, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]


@contextmanager
def tiled(tile: dict):
    """refit_swaps' scan with `tile` instead of its default."""
    original = refit_triton.best_swaps
    refit_triton.best_swaps = lambda *arguments, **options: original(*arguments, **options, **tile)
    try:
        yield
    finally:
        refit_triton.best_swaps = original


def refine_seconds(weight, gram, keep, swaps: int, tile: dict) -> tuple[float, torch.Tensor]:
    """Seconds to build one batch and take `swaps` swaps in every row with `tile`, and the masks."""
    def refine() -> torch.Tensor:
        mask, count = keep.clone(), torch.zeros(len(keep), dtype=torch.long, device=keep.device)
        converged = torch.zeros(len(keep), dtype=torch.bool, device=keep.device)
        _refine(_Batch(weight, gram, 0.0, keep, None, scan="triton"), weight, gram, float(gram.diagonal().max()),
                swaps, mask, count, converged)
        return mask

    with tiled(tile):
        mask, seconds = synchronized(refine)
    return seconds, mask


def time_tiles(name: str, rows: int, width: int, say) -> dict:
    """Every tile's scan time on one batch (each checked against the default tile's result); the fastest."""
    weight, gram, keep = synthetic_batch(rows, width, 0.6)
    batch = _Batch(weight, gram, 0.0, keep, None, scan="triton")
    scale = float(gram.diagonal().max())
    want = batch.best_swaps(scale)
    gigabytes = batch.u.numel() * 8 / 1e9
    timings = []
    for tile in TILES:
        with tiled(tile):
            same = all(torch.equal(x, y) for x, y in zip(batch.best_swaps(scale), want))
            ms = triton.testing.do_bench(lambda: batch.best_swaps(scale), return_mode="median")
        timings.append((ms, tile))
        say(f"{name} ({rows} rows x {width}, U {gigabytes:.2f} GB) {tile}: {ms:.3f} ms, {gigabytes / ms:.2f} TB/s, "
            f"same (Δ, slots) as the default: {same}")
        if not same:
            raise SystemExit(f"tile {tile} changed the scan's result")
    return min(timings, key=lambda timing: timing[0])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--swaps", type=int, default=20)
    args = parser.parse_args()
    say = line_report(args.out)

    say(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    fastest = time_tiles("down_proj", 10, 14336, say)
    torch.cuda.empty_cache()
    time_tiles("q_proj", 128, 4096, say)
    torch.cuda.empty_cache()
    weight, gram, keep = synthetic_batch(10, 14336, 0.6)
    default, reference = dict(block_i=32, block_j=64, num_warps=4), None
    for tile in (default, fastest, default, fastest):
        seconds, mask = refine_seconds(weight, gram, keep, args.swaps, tile)
        reference = mask if reference is None else reference
        say(f"down_proj, 10 rows, {args.swaps} swaps each, build included, tile {tile}: {seconds:.2f} s, "
            f"same masks as the default tile's first run: {torch.equal(mask, reference)}")


if __name__ == "__main__":
    main()
