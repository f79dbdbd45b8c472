"""GPU benchmark of the 1-swap search and refinement on layers shaped like LLaMA-2-7B and -70B.

G comes from synthetic correlated activations with outlier channels (the time of a fixed number of
iterations does not depend on trained weights). For every shape and pattern it records the scan's time,
pairs evaluated per second (the fused kernel scans the full d x d square per row; useful pairs are p*k),
the share of the floor, the time per refinement iteration and peak memory. The floor: the scan needs 3
arithmetic operations per evaluated pair (multiply, FMA, min), so floor = measured FMA rate / 3, with the
rate in operations per second. For --dtype float16 the rate is of packed HFMA2 (two operations each,
measured at about the float32 rate on the H100) and the floor is rate / 2 (see OPERATIONS_PER_PAIR).

--dtype float16 times the filtering scan (float16 kernel, 4 candidate j per row re-scored in float32, rows
with no improving candidate re-scanned in float32) and records how often it picks the float32 scan's pair
along the exact trajectory; --real-layers adds that on real layers (benchmarks/experiments/export_layers.py),
with both refinements' objectives.

    python benchmarks/bench_swaps.py --models 7B,70B --model-7b --out results/     # JSON + markdown
    python benchmarks/bench_swaps.py --model-7b --out results/   # also the 224-layer 7B-shaped refinement
    python benchmarks/bench_swaps.py --dtype float16 --real-layers layers.safetensors --out results/
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseswaps import MaskProblem, mask_from_scores  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402
from sparseswaps.solvers.swaps import apply_swaps, pairs_per_row, refine, scan_filtered, scan_nm  # noqa: E402
from sparseswaps.solvers.swaps_triton import GLUON, half_shortlist, scan_per_row_triton, tuned_config  # noqa: E402

SHAPES = {"7B": [(4096, 4096), (11008, 4096), (4096, 11008)],
          "70B": [(8192, 8192), (28672, 8192), (8192, 28672)]}
PATTERNS = [{"sparsity": 0.5}, {"sparsity": 0.6}, {"pattern": "2:4"}]
# Arithmetic operations per evaluated pair that share the limiting pipe. float32: FMUL, FFMA, FMNMX (the
# scan reaches 78% of rate / 3). float16: HMUL2 and HFMA2; HMNMX2 issues elsewhere (at rate / 3 the float16
# scan measured above 100%).
OPERATIONS_PER_PAIR = {"float32": 3, "float16": 2}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def filtered_scan(w, mask, c, gram, pattern):
    return scan_filtered(w, mask, c, gram, pattern, shortlist=half_shortlist, exact_scan=scan_per_row_triton)


def measured_fma_rate(dtype: torch.dtype) -> float:
    """FMA operations per second of this GPU in `dtype`, from a Triton kernel of independent FMA chains
    (float16 compiles to packed HFMA2, two operations per instruction)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_chains(out, iterations, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = (offsets.to(tl.float32) * 1e-9).to(out.dtype.element_ty)
        b, c, d, e, f, g, h = a + 1, a + 2, a + 3, a + 4, a + 5, a + 6, a + 7
        for _ in range(iterations):
            a = a * 0.99 + 0.01
            b = b * 0.99 + 0.01
            c = c * 0.99 + 0.01
            d = d * 0.99 + 0.01
            e = e * 0.99 + 0.01
            f = f * 0.99 + 0.01
            g = g * 0.99 + 0.01
            h = h * 0.99 + 0.01
        tl.store(out + offsets, a + b + c + d + e + f + g + h)

    block, programs, iterations = 1024, 132 * 64, 4096
    out = torch.empty(block * programs, device="cuda", dtype=dtype)
    fma_chains[(programs,)](out, iterations, BLOCK=block)
    seconds = triton.testing.do_bench(lambda: fma_chains[(programs,)](out, iterations, BLOCK=block),
                                      return_mode="median") / 1e3
    return block * programs * iterations * 8 / seconds


def synthetic_layer(rows: int, d: int, seed: int, tokens: int = 2048, rank: int = 256, device: str = "cuda"):
    """(weight, G): correlated low-rank activations plus noise, a few heavy outlier channels."""
    generator = torch.Generator(device=device).manual_seed(seed)
    latent = torch.randn(tokens, rank, device=device, generator=generator)
    mixing = torch.randn(rank, d, device=device, generator=generator) / rank ** 0.5
    x = latent @ mixing + 0.5 * torch.randn(tokens, d, device=device, generator=generator)
    x[:, torch.randperm(d, device=device, generator=generator)[: max(1, d // 256)]] *= 30
    weight = torch.randn(rows, d, device=device, generator=generator) * 0.02
    weight *= torch.empty_like(weight).exponential_(generator=generator)   # heavier tails
    return weight, x.T @ x


def bench_layer(rows, d, spec, iterations, dtype, seed=0) -> dict:
    import triton

    weight, gram = synthetic_layer(rows, d, seed)
    problem = MaskProblem(weight, gram, check_psd=False, **spec)
    mask = mask_from_scores(problem.wanda_scores(), problem.pattern)
    c = ((weight.double() * ~mask) @ gram.double()).float()
    per_row = "pattern" not in spec
    scan = scan_nm if not per_row else filtered_scan if dtype == torch.float16 else scan_per_row_triton
    scan(weight, mask, c, gram, problem.pattern)   # compile / autotune outside the timing
    scan_seconds = triton.testing.do_bench(lambda: scan(weight, mask, c, gram, problem.pattern),
                                           warmup=50, rep=400, return_mode="median") / 1e3
    useful = rows * pairs_per_row(d, problem.pattern)
    evaluated = rows * d * d if per_row else useful
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    solution = refine(problem, mask, max_iters=iterations, dtype=dtype)
    torch.cuda.synchronize()
    refine_seconds = time.perf_counter() - started
    row = {"rows": rows, "d": d, "pattern": str(problem.pattern), "scan_ms": scan_seconds * 1e3,
           "kernel": kernel_label(dtype) if per_row else None,
           "kernel_config": tuned_config(half=dtype == torch.float16) if per_row else None,
           "evaluated_pairs_per_s": evaluated / scan_seconds, "useful_pairs_per_s": useful / scan_seconds,
           "iterations": solution.extra["iterations"], "refine_s": refine_seconds,
           "s_per_iteration": refine_seconds / max(1, solution.extra["iterations"]),
           "swaps": solution.extra["swaps_total"], "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    if per_row and dtype == torch.float16:
        row["filter_agreement"] = filter_agreement(weight, gram, mask, problem.pattern, iterations)
    return row


def kernel_label(dtype: torch.dtype) -> str:
    return ("gluon" if GLUON else "triton") + ("-fp16" if dtype == torch.float16 else "")


def filter_agreement(weight, gram, mask, pattern, iterations: int) -> float:
    """Share of (row, iteration) where the float16 filter picks the float32 scan's pair, along the float32
    scan's trajectory (both see the same state every iteration)."""
    mask = mask.clone()
    c = (weight * ~mask) @ gram
    agree = total = 0
    for _ in range(iterations):
        best, i, j = scan_per_row_triton(weight, mask, c, gram, pattern)
        _, filter_i, filter_j = filtered_scan(weight, mask, c, gram, pattern)
        agree += int(((filter_i == i) & (filter_j == j)).sum())
        total += len(i)
        apply_swaps(mask, c, weight, gram, i, j, best < 0)
    return agree / total


def real_layer_rows(path: Path, iterations: int) -> list[dict]:
    """Per layer of a file from export_layers.py: float32 and float16 refinement of Wanda's 50% mask."""
    from safetensors.torch import load_file

    tensors = load_file(str(path), device="cuda")
    rows = []
    for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        weight, gram = tensors[f"{name}.weight"].float(), tensors[f"{name}.gram"].float()
        problem = MaskProblem(weight, gram, sparsity=0.5, check_psd=False)
        mask = mask_from_scores(problem.wanda_scores(), problem.pattern)
        row = {"layer": name, "rows": problem.rows, "d": problem.d, "wanda": float(problem.objective(mask).sum())}
        for label, dtype in DTYPES.items():
            torch.cuda.synchronize()
            started = time.perf_counter()
            solution = refine(problem, mask, max_iters=iterations, dtype=dtype)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            row[label] = {"objective": float(problem.objective(solution.mask).sum()), "seconds": seconds,
                          "swaps": solution.extra["swaps_total"], "rows_converged": solution.extra["rows_converged"]}
        row["filter_agreement"] = filter_agreement(weight, gram, mask, problem.pattern, iterations)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_7b_model(iterations: int, blocks: int, dtype: torch.dtype, report_block) -> dict:
    """The linear layers of `blocks` blocks of a LLaMA-2-7B-shaped model (32 blocks, 224 layers in all),
    `iterations` each, Wanda warm start. q/k/v share one G (one input), gate/up share one; o and down have
    their own, as in the real model. `report_block` gets the totals so far after every block."""
    per_block = [("q", 4096, 4096, "qkv"), ("k", 4096, 4096, "qkv"), ("v", 4096, 4096, "qkv"),
                 ("o", 4096, 4096, "o"), ("gate", 11008, 4096, "mlp"), ("up", 11008, 4096, "mlp"),
                 ("down", 4096, 11008, "down")]
    torch.cuda.reset_peak_memory_stats()
    total, swaps, layers = 0.0, 0, 0
    for block in range(blocks):
        grams = {}
        for name, rows, d, shared in per_block:
            weight, gram = synthetic_layer(rows, d, seed=block * 10 + len(grams) + 1)
            gram = grams.setdefault(shared, gram)
            problem = MaskProblem(weight, gram, sparsity=0.5, check_psd=False)
            mask = mask_from_scores(problem.wanda_scores(), problem.pattern)
            torch.cuda.synchronize()
            started = time.perf_counter()
            solution = refine(problem, mask, max_iters=iterations, dtype=dtype)
            torch.cuda.synchronize()
            total += time.perf_counter() - started
            swaps += solution.extra["swaps_total"]
            layers += 1
        totals = {"blocks": block + 1, "layers": layers, "iterations": iterations, "sparsity": 0.5, "dtype": str(dtype),
                  "refine_s": total, "swaps": swaps, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
        report_block(totals)
    return totals


def rate_key(dtype: str) -> str:
    return "fp32_instructions_per_s" if dtype == "float32" else "fp16_operations_per_s"


def markdown(report: dict) -> str:
    floor = report["floor_pairs_per_s"]
    dtype = report.get("dtype", "float32")
    half = dtype == "float16"
    lines = [f"# 1-swap scan on {report['environment']['device']}" + (" (float16 filter)" if half else ""), "",
             f"Measured {dtype} FMA rate {report[rate_key(dtype)] / 1e12:.1f} T operations/s"
             + (" (packed HFMA2, two per instruction)" if half else "") + f"; the scan needs "
             f"{report['instructions_per_pair']} per evaluated pair on the limiting pipe, so the floor is "
             f"{floor / 1e12:.2f} T pairs/s.", "",
             "The kernel evaluates the full d x d square per row so that rows share G; only p*k of those pairs "
             "(pruned i, kept j) are useful, a quarter at 50%. Both shares of the floor are given.", "",
             "| layer | pattern | kernel | scan ms | evaluated pairs/s | share of floor | useful pairs/s | "
             "useful share | s / iteration | swaps | peak GiB |" + (" same pair as float32 |" if half else ""),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if half else "")]
    for row in report["layers"]:
        per_row = "keep" in row["pattern"]
        share = f"{row['evaluated_pairs_per_s'] / floor:.0%}" if per_row else "n/a (torch N:M)"
        useful_share = f"{row['useful_pairs_per_s'] / floor:.1%}" if per_row else "n/a"
        kernel = row.get("kernel", "triton" if per_row else None) or "torch"   # older runs did not record it
        agreement = f" {row['filter_agreement']:.2%} |" if "filter_agreement" in row else " n/a |" if half else ""
        lines.append(f"| {row['model']} {row['rows']}x{row['d']} | {row['pattern']} | {kernel} | "
                     f"{row['scan_ms']:.2f} | {row['evaluated_pairs_per_s'] / 1e12:.2f} T | {share} | "
                     f"{row['useful_pairs_per_s'] / 1e12:.2f} T | {useful_share} | {row['s_per_iteration']:.3f} | "
                     f"{row['swaps']} | {row['peak_memory_gib']:.1f} |" + agreement)
    if report.get("model_7b"):
        m = report["model_7b"]
        lines += ["", f"7B-shaped model, {m['blocks']} of 32 blocks ({m['layers']} of 224 linear layers) refined, "
                      f"{m['iterations']} iterations at 50%: {m['refine_s']:.1f} s of refinement measured, "
                      f"{m['swaps']} swaps, peak {m['peak_memory_gib']:.1f} GiB."]
        if m["blocks"] < 32:
            lines.append(f"All 32 blocks have these shapes; at the measured rate the whole model would take about "
                         f"{m['refine_s'] * 32 / m['blocks']:.0f} s (an extrapolation, not a measurement).")
    if report.get("real_layers"):
        lines += ["", f"Real layers, Wanda's 50% mask refined for {report['iterations_real']} iterations:", "",
                  "| layer | rows x d | Wanda | float32 objective | float16 objective | float32 s | float16 s | "
                  "same pair as float32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["real_layers"]:
            lines.append(f"| {row['layer']} | {row['rows']}x{row['d']} | {row['wanda']:.6g} | "
                         f"{row['float32']['objective']:.8g} | {row['float16']['objective']:.8g} | "
                         f"{row['float32']['seconds']:.2f} | {row['float16']['seconds']:.2f} | "
                         f"{row['filter_agreement']:.2%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="7B,70B", help="layer shapes to time (empty: none, e.g. with --model-7b)")
    parser.add_argument("--iterations", type=int, default=5, help="refinement iterations timed per layer")
    parser.add_argument("--model-7b", action="store_true", help="also refine a whole 7B-shaped model")
    parser.add_argument("--model-7b-iterations", type=int, default=100)
    parser.add_argument("--model-7b-blocks", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="scan arithmetic (float16: the filtering scan; writes bench_swaps_half.*)")
    parser.add_argument("--real-layers", type=Path, help="safetensors from export_layers.py (with --dtype float16)")
    parser.add_argument("--real-iterations", type=int, default=100)
    args = parser.parse_args()
    if args.real_layers and args.dtype != "float16":
        parser.error("--real-layers compares the float16 filter with float32: add --dtype float16")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[args.dtype]
    rate = measured_fma_rate(dtype)
    report = {"environment": environment(), "dtype": args.dtype, rate_key(args.dtype): rate,
              "instructions_per_pair": OPERATIONS_PER_PAIR[args.dtype],
              "floor_pairs_per_s": rate / OPERATIONS_PER_PAIR[args.dtype],
              "iterations_timed": args.iterations, "layers": []}
    result = args.out / ("bench_swaps.json" if args.dtype == "float32" else "bench_swaps_half.json")
    models = list(filter(None, args.models.split(",")))
    if set(models) - set(SHAPES):
        parser.error(f"--models takes {', '.join(SHAPES)} (comma-separated), got {args.models!r}")
    for model in models:
        for rows, d in SHAPES[model]:
            for spec in PATTERNS:
                if "pattern" in spec and args.dtype != "float32":
                    continue   # N:M scans are exact torch whatever the dtype
                row = {"model": model, **bench_layer(rows, d, spec, args.iterations, dtype)}
                report["layers"].append(row)
                print(json.dumps(row), flush=True)
                result.write_text(json.dumps(report, indent=2))
    if args.model_7b:
        def save_block(totals: dict) -> None:   # a run cut short still leaves its finished blocks
            report["model_7b"] = totals
            result.write_text(json.dumps(report, indent=2))
            print(f"7B-shaped refinement: block {totals['blocks']}/{args.model_7b_blocks}, "
                  f"{totals['refine_s']:.1f} s of refinement so far", flush=True)

        bench_7b_model(args.model_7b_iterations, args.model_7b_blocks, dtype, save_block)
    if args.real_layers:
        report["iterations_real"] = args.real_iterations
        report["real_layers"] = real_layer_rows(args.real_layers, args.real_iterations)
    result.write_text(json.dumps(report, indent=2))
    result.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
