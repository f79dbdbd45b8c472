"""Gram accumulation from bfloat16 activations: float32 CUDA cores against tensor cores with float32 output.

The pipeline accumulates G = Σ xᵀx per calibration sample (sparseswaps.calibration.accumulate_gram). With a
bf16 model the activations are bf16; a product of two bf16 numbers is exact in float32, so the tensor-core
GEMM with float32 output is the float32 Gram up to summation order. This measures both routes at the
Llama-3-8B widths and the paper protocol's 128 x 2048 tokens: seconds, and the relative Frobenius error of
each against the same sums in float64.

    python benchmarks/bench_gram.py --out benchmarks/results/gram_bf16_h200.json      # on a GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseswaps.calibration import accumulate_gram  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402


def samples(d: int, count: int, seqlen: int, seed: int = 0):
    """bf16 activations with a few heavy channels, as LLM layer inputs have."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.ones(d, device="cuda")
    scale[torch.randperm(d, device="cuda", generator=generator)[: d // 256]] = 30
    for _ in range(count):
        yield (torch.randn(seqlen, d, device="cuda", generator=generator) * scale).bfloat16()


def accumulate(d: int, count: int, seqlen: int, route: str) -> tuple[torch.Tensor, float]:
    gram = torch.zeros(d, d, device="cuda", dtype=torch.float64 if route == "float64" else torch.float32)
    seconds = 0.0
    for x in samples(d, count, seqlen):
        torch.cuda.synchronize()
        started = time.perf_counter()
        if route == "float32":
            x32 = x.float()
            gram.addmm_(x32.T, x32)
        else:
            accumulate_gram(gram, x if route == "tensor cores" else x.double())
        torch.cuda.synchronize()
        seconds += time.perf_counter() - started
    return gram, seconds


def measure(d: int, count: int, seqlen: int) -> list[dict]:
    accumulate(d, 2, seqlen, "tensor cores")            # warm up cuBLAS
    accumulate(d, 2, seqlen, "float32")
    reference, _ = accumulate(d, count, seqlen, "float64")
    rows = []
    for route in ("float32", "tensor cores"):
        gram, seconds = accumulate(d, count, seqlen, route)
        error = ((gram.double() - reference).norm() / reference.norm()).item()
        rows.append({"d": d, "tokens": count * seqlen, "route": route, "seconds": seconds,
                     "tflops": 2 * count * seqlen * d * d / seconds / 1e12, "relative_error_vs_float64": error})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| d | tokens | route | seconds | TFLOP/s | relative error vs float64 |", "|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r['d']} | {r['tokens']} | {r['route']} | {r['seconds']:.3f} | {r['tflops']:.0f} | "
              f"{r['relative_error_vs_float64']:.2e} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="4096,14336")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gram measures CUDA routes: run it on a GPU")
    rows = sum((measure(int(d), args.nsamples, args.seqlen) for d in args.widths.split(",")), [])
    args.out.write_text(json.dumps({"rows": rows, "environment": environment()}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
