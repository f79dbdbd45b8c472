"""refit_swaps' scan engines on real layers: the fused Triton scan against the torch scan, in the same run.

Each layer of a file from benchmarks/experiments/export_layers.py is pruned to every target from a warm start
(ALPS, the best chain's, by default), then refined by `refit_swaps` once per engine with the same options.
The table gives each engine's seconds, their ratio (the stable figure), the swaps taken, the rows at a local
optimum, and whether the engines chose the same masks. `--synthetic ROWS` adds ROWS rows of two
Llama-3-8B-shaped synthetic layers (bench_swaps.synthetic_layer: 4096 inputs as q_proj, 14336 as down_proj):
the time and memory of refit_swaps at 8B widths, with swap counts of synthetic data, not a real model's.

    python benchmarks/bench_refit_swaps.py --real-layers layers.safetensors --out benchmarks/results/bench_refit_swaps.json
    python benchmarks/bench_refit_swaps.py --synthetic 64 --warm-start wanda --diagonal-damping 0.01 --out X.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparseswaps as ss  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402


def problem_for(weight, gram, target: str) -> ss.MaskProblem:
    spec = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    return ss.MaskProblem(weight.float(), gram.float(), check_psd=False, **spec)


def compare(name: str, problem: ss.MaskProblem, target: str, warm: str, engines: list[str],
            max_iters: int, damping: float, diagonal_damping: float = 0.0) -> dict:
    start = ss.solve(problem, warm).mask
    options = {"warm_start": start, "max_iters": max_iters, "damping": damping, "diagonal_damping": diagonal_damping}
    for engine in engines:    # compile and warm up outside the timings
        ss.solve(problem, "refit_swaps", engine=engine, **{**options, "max_iters": 1})
    results = {engine: ss.solve(problem, "refit_swaps", engine=engine, **options) for engine in engines}
    first = results[engines[0]]
    row = {"layer": name, "rows": problem.rows, "d": problem.d, "target": target, "warm_start": warm,
           "max_iters": max_iters, "damping": damping, "diagonal_damping": diagonal_damping,
           "swaps": first.extra["swaps_total"],
           "rows_converged": first.extra["rows_converged"],
           "same_masks": all(torch.equal(r.mask, first.mask) for r in results.values()),
           "seconds": {engine: r.runtime_s for engine, r in results.items()}}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], engines: list[str]) -> str:
    ratio = len(engines) == 2
    head = "| layer | rows x d | target | max swaps | swaps | rows converged | same masks | " + " | ".join(
        f"{engine} s" for engine in engines) + (f" | {engines[0]} / {engines[1]} |" if ratio else " |")
    lines = [head, "|" + "---|" * (7 + len(engines) + ratio)]
    for row in rows:
        seconds = [row["seconds"][engine] for engine in engines]
        lines.append(f"| {row['layer']} | {row['rows']}x{row['d']} | {row['target']} | {row['max_iters']} | "
                     f"{row['swaps']} | {row['rows_converged']}/{row['rows']} | {row['same_masks']} | "
                     + " | ".join(f"{s:.2f}" for s in seconds)
                     + (f" | {seconds[0] / seconds[1]:.2f} |" if ratio else " |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-layers", type=Path)
    parser.add_argument("--synthetic", type=int, metavar="ROWS", help="also ROWS rows of two 8B-shaped synthetic layers")
    parser.add_argument("--targets", default="0.5,0.6,2:4,0.7")
    parser.add_argument("--warm-start", default="alps")
    parser.add_argument("--max-iters", default="20", help="comma-separated caps on swaps per row")
    parser.add_argument("--damping", type=float, default=1e-6, help="as run_pruning's alps+refit_swaps")
    parser.add_argument("--diagonal-damping", type=float, default=0.0, help="as run_pruning's *_diag chains")
    parser.add_argument("--rows", type=int, help="only the first ROWS rows of each layer")
    parser.add_argument("--engines", help="default: torch,triton on CUDA, torch on the CPU")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not (args.real_layers or args.synthetic):
        parser.error("give --real-layers FILE, --synthetic ROWS or both")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engines = (args.engines or ("torch,triton" if device == "cuda" else "torch")).split(",")
    rows = []
    for name, weight, gram in layers(args.real_layers, args.rows, args.synthetic, device):
        for target in args.targets.split(","):
            for max_iters in (int(m) for m in args.max_iters.split(",")):
                rows.append(compare(name, problem_for(weight, gram, target), target, args.warm_start, engines,
                                    max_iters, args.damping, args.diagonal_damping))
                report = {"device": device, "engines": engines, "rows": rows, "environment": environment()}
                args.out.write_text(json.dumps(report, indent=1))      # each row kept as it comes
                args.out.with_suffix(".md").write_text(markdown(rows, engines) + "\n")
    print(markdown(rows, engines))


def layers(real_layers: Path | None, rows: int | None, synthetic: int | None, device: str):
    """(name, weight, G) of every layer asked for: the first `rows` rows of each layer of a file from
    export_layers.py, then `synthetic` rows of two Llama-3-8B-shaped synthetic layers."""
    if real_layers:
        from safetensors.torch import load_file

        tensors = load_file(str(real_layers), device=device)
        for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
            yield name, tensors[f"{name}.weight"][:rows], tensors[f"{name}.gram"]
    if synthetic:
        from bench_swaps import synthetic_layer

        for name, d in (("synthetic 8B q_proj", 4096), ("synthetic 8B down_proj", 14336)):
            yield (name, *synthetic_layer(synthetic, d, seed=0, device=device))


def synthetic_batch(rows: int, width: int, sparsity: float = 0.6, device: str = "cuda"):
    """(weight float64, G + 0.01 diag G float64, Wanda's mask) of `rows` synthetic Llama-3-8B-shaped rows of
    `width` inputs: what the profiling experiments build refit_swaps' state from."""
    from bench_swaps import synthetic_layer
    from sparseswaps.solvers.refit import with_diagonal_damping

    weight, gram = synthetic_layer(rows, width, seed=0, device=device)
    problem = ss.MaskProblem(weight, gram, sparsity=sparsity, check_psd=False)
    keep = ss.mask_from_scores(problem.wanda_scores(), problem.pattern)
    return weight.double(), with_diagonal_damping(gram.double(), 0.01), keep


def synchronized(function):
    """(result, seconds) of one call of `function`, the GPU's queue drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def line_report(path: Path):
    """say(line): print it and append it to `path` (emptied here), so a run cut short keeps what it measured."""
    path.write_text("")

    def say(line: str) -> None:
        print(line, flush=True)
        with path.open("a") as out:
            out.write(line + "\n")
    return say


if __name__ == "__main__":
    main()
