"""Where a `refit_swaps` swap spends its time at an 8B down_proj width, on CUDA.

One batch of synthetic Llama-3-8B down_proj rows (bench_swaps.synthetic_layer, 14336 inputs, Wanda's mask):
the time of building the state, of the fused scan and of the swap's update, each against the bytes it must
move (the achieved bandwidth says how far each is from the memory floor); a torch.profiler table of a few
swaps; and the rank-two update of H alone by `baddbmm_` against a plain Triton kernel that reads and writes
H once, so a lever is measured before it is built.

    python benchmarks/experiments/profile_refit_swaps.py --rows 10 --swaps 10 --out profile.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench_refit_swaps import line_report, synchronized, synthetic_batch  # noqa: E402
from sparseswaps.solvers.refit_swaps import _Batch  # noqa: E402


@triton.jit
def _rank_two_kernel(c, left, right, k, n, stride_cb, stride_ci, stride_cj, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    row, tile_i, tile_j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
    in_i, in_j = i < k, j < n
    l0 = tl.load(left + row * k * 2 + i * 2, mask=in_i, other=0.0)[:, None]
    l1 = tl.load(left + row * k * 2 + i * 2 + 1, mask=in_i, other=0.0)[:, None]
    r0 = tl.load(right + row * 2 * n + j, mask=in_j, other=0.0)[None, :]
    r1 = tl.load(right + row * 2 * n + n + j, mask=in_j, other=0.0)[None, :]
    at = c + row.to(tl.int64) * stride_cb + i[:, None] * stride_ci + j[None, :] * stride_cj
    allowed = in_i[:, None] & in_j[None, :]
    tl.store(at, tl.load(at, mask=allowed) + (l0 * r0 + l1 * r1), mask=allowed)


def rank_two_triton(c, left, right, block_i: int = 32, block_j: int = 128):
    """c += left @ right, c [B, k, n] (any strides), left [B, k, 2], right [B, 2, n], reading and writing c once."""
    if c.stride(2) != 1:                          # column-major (cholesky_inverse's H): update its transpose
        c, left, right = c.mT, right.mT, left.mT
    batch, k, n = c.shape
    grid = (batch, triton.cdiv(k, block_i), triton.cdiv(n, block_j))
    _rank_two_kernel[grid](c, left.contiguous(), right.contiguous(), k, n, c.stride(0), c.stride(1), c.stride(2),
                           BLOCK_I=block_i, BLOCK_J=block_j, num_warps=4)


def seconds(function, repeat: int = 5) -> float:
    """Fastest wall time of `repeat` synchronised calls."""
    return min(synchronized(function)[1] for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10, help="rows in the batch (the solver's own batch at 60%%)")
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--swaps", type=int, default=10, help="swaps timed one by one")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    say = line_report(args.out)

    weight, gram, keep = synthetic_batch(args.rows, args.width, args.sparsity, args.device)
    scale = float(gram.diagonal().max())
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    say(f"# {device}, torch {torch.__version__}, triton {triton.__version__}; "
        f"{args.rows} rows x {args.width} inputs, {args.sparsity:.0%} sparsity, G + 0.01 diag G")

    batch, build = synchronized(lambda: _Batch(weight, gram, 0.0, keep, None,
                                               scan="triton" if args.device == "cuda" else "torch"))
    k, p = batch.u.shape[1], batch.u.shape[2]
    h_bytes, u_bytes = 8 * args.rows * k * k, 8 * args.rows * k * p
    say(f"H strides {tuple(batch.h.stride())}, U strides {tuple(batch.u.stride())}")
    say(f"k {k}, p {p}; H {h_bytes / 1e9:.2f} GB, U {u_bytes / 1e9:.2f} GB for the batch; "
        f"build the state {build:.2f} s ({build / args.rows * 1e3:.1f} ms per row)")

    best, a, b = batch.best_swaps(scale)          # compiles the scan
    batch.swap(a, b, best)
    scan_s, swap_s = [], []
    for _ in range(args.swaps):
        (best, a, b), scan = synchronized(lambda: batch.best_swaps(scale))
        _, update = synchronized(lambda: batch.swap(a, b, best))
        scan_s.append(scan)
        swap_s.append(update)
    scan, update = min(scan_s), min(swap_s)
    say(f"scan {scan * 1e3:.2f} ms ({u_bytes / scan / 1e12:.2f} TB/s reading U); update {update * 1e3:.2f} ms "
        f"({2 * (h_bytes + u_bytes) / update / 1e12:.2f} TB/s reading and writing H and U); "
        f"per row and swap {(scan + update) / args.rows * 1e3:.3f} ms")

    def three_swaps() -> None:
        for _ in range(3):
            best, a, b = batch.best_swaps(scale)
            batch.swap(a, b, best)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        synchronized(three_swaps)
    say(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))

    h = batch.h
    left = torch.randn(args.rows, k, 2, dtype=torch.float64, device=args.device) * 1e-3
    right = torch.randn(args.rows, 2, k, dtype=torch.float64, device=args.device) * 1e-3
    copy = h.clone()
    expected = torch.baddbmm(h, left, right)
    rank_two_triton(copy, left, right)
    relative = float((copy - expected).abs().max() / expected.abs().max())
    say(f"rank-two Triton kernel against baddbmm: max |difference| / max |H| {relative:.3e}")
    del copy, expected
    baddbmm_s = seconds(lambda: h.baddbmm_(left, right))
    triton_s = seconds(lambda: rank_two_triton(h, left, right))
    scale_s = seconds(lambda: h.mul_(1.0))
    say(f"rank-two update of H ({h_bytes / 1e9:.2f} GB): baddbmm_ {baddbmm_s * 1e3:.2f} ms "
        f"({2 * h_bytes / baddbmm_s / 1e12:.2f} TB/s), Triton {triton_s * 1e3:.2f} ms "
        f"({2 * h_bytes / triton_s / 1e12:.2f} TB/s), mul_(1) {scale_s * 1e3:.2f} ms ({2 * h_bytes / scale_s / 1e12:.2f} TB/s)")


if __name__ == "__main__":
    main()
