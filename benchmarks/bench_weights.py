"""Masks and weights together, layer by layer: the error each chain leaves on real SmolLM2-135M layers.

For each layer (weight and calibration Gram from benchmarks/experiments/export_layers.py) and target, every
chain's error relative to the dense output energy: for mask-only chains (w ⊙ m), for weight-updating ones
with their weights (`weight_objective`), both recomputed in float64 by the registry; and the seconds each
took on this machine. Layer-wise only: what a full model gains is the full-model tables' question.

    python benchmarks/experiments/export_layers.py --out layers.safetensors
    python benchmarks/bench_weights.py --layers layers.safetensors --out benchmarks/results/weights_layers_cpu.json
    python benchmarks/bench_weights.py --oracle --out benchmarks/results/weights_gaps_d12_cpu.json
    python benchmarks/bench_weights.py --oracle --scip-d 24 --workers 2 --out benchmarks/results/weights_gaps_d24_scip_cpu.json
    python benchmarks/bench_weights.py --layers layers.safetensors --refit-swaps-max-d 576 \
        --out benchmarks/results/weights_layers_refit_swaps_cpu.json

`--oracle`: synthetic rows of 12 inputs (the test families), every chain's gap to the proven optimum of
masks and weights together (`bruteforce_refit`): mean over rows of (error - optimum) / optimum. With
`--scip-d 24`, the real 24-input SmolLM2 rows against `scip_refit`'s bound instead.
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

CHAINS = [["wanda"], ["wanda", "refit"], ["wanda", "swaps"], ["wanda", "swaps", "refit"], ["sparsegpt"],
          ["sparsegpt", "refit"], ["admm"], ["admm", "refit"], ["alps"]]
# 1-swaps on the re-fitted error: on the oracle instances, and on layers with --refit-swaps-max-d
ORACLE_CHAINS = CHAINS + [["wanda", "swaps", "refit_swaps"], ["admm", "refit_swaps"], ["alps", "refit_swaps"]]
TARGETS = {"50%": {"sparsity": 0.5}, "60%": {"sparsity": 0.6}, "2:4": {"pattern": "2:4"}}
SWAPS = {"max_iters": 1000, "swaps_per_scan": 16}     # to a 1-swap local optimum (per-row patterns)


def run_chain(problem: ss.MaskProblem, chain: list[str]) -> ss.SolveResult:
    """The chain's mask stages (swaps with SWAPS), then refit on their mask where the chain ends with it."""
    stages = chain[:-1] if chain[-1] == "refit" else chain
    options = {}
    if stages[-1] == "swaps":
        options = {k: v for k, v in SWAPS.items() if isinstance(problem.pattern, ss.PerRow) or k != "swaps_per_scan"}
    result = ss.solve(problem, stages, **options)
    if chain[-1] != "refit":
        return result
    refitted = ss.solve(problem, "refit", warm_start=result.mask)
    refitted.runtime_s += result.runtime_s
    return refitted


def row_errors(result: ss.SolveResult) -> torch.Tensor:
    """Each row's error with the chain's own weights (w ⊙ m for mask-only chains)."""
    return result.row_weight_objective if result.weight is not None else result.row_objective


def measure(name: str, weight: torch.Tensor, gram: torch.Tensor, targets: list[str], chains: list) -> list[dict]:
    rows = []
    for target in targets:
        problem = ss.MaskProblem(weight, gram, check_psd=False, **TARGETS[target])
        dense = float(problem.objective(torch.zeros_like(weight, dtype=torch.bool)).sum())
        for chain in chains:
            result = run_chain(problem, chain)
            error = float(row_errors(result).sum())
            rows.append({"layer": name, "shape": list(weight.shape), "target": target, "chain": "+".join(chain),
                         "relative_error": error / dense, "mask_relative_error": result.objective / dense,
                         "seconds": result.runtime_s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def oracle_instances():
    """(label, target, problem): the test families at 12 inputs, and the real 16-input SmolLM2 sub-layers
    (21 instances of 2 rows, pooled under one label)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_problem

    for family in ("iid", "correlated", "outliers"):
        for target, spec in TARGETS.items():
            yield f"{family} d=12", target, make_problem(family, rows=32, d=12, seed=0, tokens=48, **spec)[0]
    yield from real_instances(16)


def real_instances(d: int):
    """(label, target, problem) of the real d-input SmolLM2 sub-layers (21 instances of 2 rows each)."""
    from sparseswaps.instances import load_instances

    real = [i for i in load_instances(Path(__file__).resolve().parent / "instances" / "smollm2") if i.d == d]
    for target in TARGETS:
        for instance in real:
            yield f"SmolLM2 real d={d}", target, instance.problem(target)


def scip_reference(problem: ss.MaskProblem, results: list[ss.SolveResult], row_time_limit: float,
                   workers: int, perspective: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(SCIP's lower bound on each row's masks-and-weights optimum, whether it is proven within 1e-6), SCIP
    started from each row's best chain."""
    errors = torch.stack([row_errors(r) for r in results])
    best = errors.argmin(0)
    start = torch.stack([results[int(k)].mask[row] for row, k in enumerate(best)])
    exact = ss.solve(problem, "scip_refit", warm_start=start, row_time_limit=row_time_limit, workers=workers,
                     perspective=perspective)
    bound = exact.row_weight_bound
    return bound, (exact.row_weight_objective - bound) <= 1e-6 * exact.row_weight_objective


def oracle_gaps(instances, scip_row_time_limit: float | None = None, workers: int = 1,
                perspective: bool = False) -> list[dict]:
    """Every chain's gap per row: to the brute-force optimum, or with `scip_row_time_limit` to SCIP's bound
    (an upper bound on the gap; equal to it within 1e-6 on the rows SCIP proves)."""
    pooled: dict[tuple, list] = {}
    for label, target, problem in instances:
        results = [run_chain(problem, chain) for chain in ORACLE_CHAINS]
        if scip_row_time_limit is None:
            reference, proven = ss.solve(problem, "bruteforce_refit").row_weight_objective, None
        else:
            reference, proven = scip_reference(problem, results, scip_row_time_limit, workers, perspective)
        for chain, result in zip(ORACLE_CHAINS, results):
            gaps = (row_errors(result) - reference) / reference.clamp_min(torch.finfo(torch.float64).tiny)
            entry = pooled.setdefault((label, target, "+".join(chain)), [[], 0.0, 0])
            entry[0] += gaps.tolist()
            entry[1] += result.runtime_s
            entry[2] += len(gaps) if proven is None else int(proven.sum())
    rows = []
    at_optimum = 1e-9 if scip_row_time_limit is None else 1e-6       # SCIP's bound gives its tolerances away
    for (label, target, chain), (gaps, seconds, proven) in pooled.items():
        rows.append({"layer": label, "target": target, "chain": chain, "relative_error": sum(gaps) / len(gaps),
                     "rows_at_optimum": sum(gap < at_optimum for gap in gaps), "rows": len(gaps),
                     "rows_proven": proven, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], oracle: bool = False) -> str:
    chains = list(dict.fromkeys(row["chain"] for row in rows))
    lines = [f"| {'instances' if oracle else 'layer'} | target | " + " | ".join(chains) + " |", "|---|---|" + "---:|" * len(chains)]
    keyed = {}
    for row in rows:
        keyed.setdefault((row["layer"], row["target"]), {})[row["chain"]] = row["relative_error"]
    for (layer, target), by_chain in keyed.items():
        best = min(by_chain.values())
        style = "{:.2%}" if oracle else "{:.4f}"
        cells = [f"**{style.format(by_chain[c])}**" if by_chain[c] == best else style.format(by_chain[c]) for c in chains]
        lines.append(f"| {layer.removeprefix('model.layers.')} | {target} | " + " | ".join(cells) + " |")
    if oracle:
        return "\n".join(lines) + "\n\nBold: lowest in the row."
    return "\n".join(lines) + ("\n\nRelative error = ||W X - Ŵ X||² / ||W X||² with each chain's weights (mask-only "
                               "chains keep w ⊙ m); bold: lowest in the row.")


def main() -> None:
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=Path, help="from benchmarks/experiments/export_layers.py")
    parser.add_argument("--oracle", action="store_true", help="gaps to the brute-force optimum on 12-input rows")
    parser.add_argument("--scip-d", type=int, default=0,
                        help="with --oracle: instead, the real SmolLM2 rows of this width against SCIP's bound")
    parser.add_argument("--row-time-limit", type=float, default=120.0, help="SCIP's seconds per row (--scip-d)")
    parser.add_argument("--workers", type=int, default=1, help="SCIP rows solved in parallel (--scip-d)")
    parser.add_argument("--perspective", action="store_true",
                        help="scip_refit's perspective formulation (--scip-d; it proves 48-input rows the big-M one does not)")
    parser.add_argument("--refit-swaps-max-d", type=int, default=0,
                        help="instead of the main chains, the refit_swaps chains on layers this narrow or narrower")
    parser.add_argument("--targets", default="50%,2:4", help="with --refit-swaps-max-d")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.oracle == (args.layers is not None):
        parser.error("give either --layers or --oracle")
    if args.oracle and args.scip_d:
        rows = oracle_gaps(real_instances(args.scip_d), args.row_time_limit, args.workers, args.perspective)
        proven = {(r["layer"], r["target"]): (r["rows_proven"], r["rows"]) for r in rows}
        note = ("\n\nMean over rows of (error - bound) / bound, the bound on the optimum of masks and weights from "
                f"scip_refit ({args.row_time_limit:g} s per row, started from each row's best chain): an upper bound "
                "on the gap, equal to it within 1e-6 on the rows SCIP proved (" +
                ", ".join(f"{target} {p} of {n}" for (_, target), (p, n) in proven.items()) + ").")
    elif args.oracle:
        rows = oracle_gaps(oracle_instances())
        note = "\n\nMean over rows of (error - optimum) / optimum, the optimum of masks and weights from bruteforce_refit."
    else:
        tensors = load_file(str(args.layers))
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        rows, note = [], ""
        if args.refit_swaps_max_d:      # the refit-aware swaps only, on the narrower layers
            names = [n for n in names if tensors[f"{n}.weight"].shape[1] <= args.refit_swaps_max_d]
            chains, targets = ORACLE_CHAINS[len(CHAINS):], args.targets.split(",")
            note = f"\n\nLayers of at most {args.refit_swaps_max_d} inputs; targets {args.targets}."
        else:
            chains, targets = CHAINS, list(TARGETS)
        for name in names:
            rows += measure(name, tensors[f"{name}.weight"].float(), tensors[f"{name}.gram"].float(), targets,
                            chains)
    args.out.write_text(json.dumps({"rows": rows, "swap_options": SWAPS, "environment": environment()}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, oracle=args.oracle) + note + "\n")
    print(markdown(rows, oracle=args.oracle))


if __name__ == "__main__":
    main()
