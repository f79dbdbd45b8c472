"""Several swaps per scan against the paper's best improvement (swaps_per_scan=1): scans, objective, time.

On real layers (benchmarks/experiments/export_layers.py) every row runs to its 1-swap local optimum, so the
table shows how many full scans each setting needs and where it lands; on Llama-3-8B-shaped synthetic layers
(bench_swaps.synthetic_layer, which never converge in 100 scans) it shows the objective after the paper's
100 scans. Both from Wanda's 50% mask, with the solver's default scan dtype (auto).

    python benchmarks/bench_swaps_per_scan.py --real-layers layers.safetensors --out benchmarks/results/swaps_per_scan.json
    python benchmarks/bench_swaps_per_scan.py --real-layers layers.safetensors --synthetic --out ...   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparseswaps as ss  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402

SYNTHETIC_8B = [(4096, 4096), (14336, 4096), (4096, 14336)]


def compare(name: str, problem: ss.MaskProblem, settings: list[int], max_iters: int, engine: str) -> list[dict]:
    start = ss.solve(problem, "wanda")
    for k in settings:      # compile and autotune outside the timings
        ss.solve(problem, "swaps", warm_start=start.mask, max_iters=2, engine=engine, swaps_per_scan=k)
    rows = []
    for k in settings:
        result = ss.solve(problem, "swaps", warm_start=start.mask, max_iters=max_iters, engine=engine,
                          swaps_per_scan=k)
        rows.append({"layer": name, "rows": problem.rows, "d": problem.d, "swaps_per_scan": k,
                     "scans": result.extra["iterations"], "swaps": result.extra["swaps_total"],
                     "rows_converged": result.extra["rows_converged"], "objective": result.objective,
                     "wanda_objective": start.objective, "seconds": result.runtime_s,
                     "scan_dtype": result.extra["dtype"], "termination": result.termination.value})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def real_layers(path: Path, settings, device, engine) -> list[dict]:
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=device)
    rows = []
    for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        problem = ss.MaskProblem(tensors[f"{name}.weight"].float(), tensors[f"{name}.gram"].float(), sparsity=0.5,
                                 check_psd=False)
        rows += compare(name, problem, settings, 100_000, engine)
    return rows


def synthetic_layers(settings) -> list[dict]:
    from bench_swaps import synthetic_layer

    rows = []
    for count, d in SYNTHETIC_8B:
        weight, gram = synthetic_layer(count, d, seed=0)
        rows += compare(f"synthetic {count}x{d}", ss.MaskProblem(weight, gram, sparsity=0.5, check_psd=False),
                        settings, 100, "auto")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | rows x d | swaps per scan | scans | swaps | rows converged | objective vs k=1 | "
             "vs Wanda | seconds | scan dtype |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    paper = {row["layer"]: row for row in rows if row["swaps_per_scan"] == 1}
    for row in rows:
        base = paper.get(row["layer"])
        versus = f"{row['objective'] / base['objective'] - 1:+.3%}" if base else "-"
        lines.append(f"| {row['layer']} | {row['rows']}x{row['d']} | {row['swaps_per_scan']} | {row['scans']} | "
                     f"{row['swaps']} | {row['rows_converged']}/{row['rows']} | {versus} | "
                     f"{row['objective'] / row['wanda_objective'] - 1:+.1%} | {row['seconds']:.2f} | "
                     f"{row['scan_dtype']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-layers", type=Path)
    parser.add_argument("--synthetic", action="store_true", help="also the 8B-shaped synthetic layers (CUDA)")
    parser.add_argument("--settings", default="1,4,16", help="swaps_per_scan values")
    parser.add_argument("--engine", default="auto", help="scan engine (results/swaps_per_scan_cpu: torch)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = args.engine
    settings = [int(k) for k in args.settings.split(",")]
    rows = real_layers(args.real_layers, settings, device, engine) if args.real_layers else []
    if args.synthetic:
        rows += synthetic_layers(settings)
    report = {"device": device, "engine": engine, "rows": rows, "environment": environment()}
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
