"""Masks and weights together, layer by layer: the error each chain leaves on real SmolLM2-135M layers.

For each layer (weight and calibration Gram from benchmarks/experiments/export_layers.py) and target, every
chain's error relative to the dense output energy: for mask-only chains (w ⊙ m), for weight-updating ones
with their weights (`weight_objective`), both recomputed in float64 by the registry; and the seconds each
took on this machine. Layer-wise only: what a full model gains is the full-model tables' question.

    python benchmarks/experiments/export_layers.py --out layers.safetensors
    python benchmarks/bench_weights.py --layers layers.safetensors --out benchmarks/results/weights_layers_cpu.json
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
          ["sparsegpt", "refit"], ["admm"], ["admm", "refit"]]
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


def measure(name: str, weight: torch.Tensor, gram: torch.Tensor) -> list[dict]:
    rows = []
    for target, spec in TARGETS.items():
        problem = ss.MaskProblem(weight, gram, check_psd=False, **spec)
        dense = float(problem.objective(torch.zeros_like(weight, dtype=torch.bool)).sum())
        for chain in CHAINS:
            result = run_chain(problem, chain)
            error = result.weight_objective if result.weight is not None else result.objective
            rows.append({"layer": name, "shape": list(weight.shape), "target": target, "chain": "+".join(chain),
                         "relative_error": error / dense, "mask_relative_error": result.objective / dense,
                         "seconds": result.runtime_s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    chains = ["+".join(chain) for chain in CHAINS]
    lines = ["| layer | target | " + " | ".join(chains) + " |", "|---|---|" + "---:|" * len(chains)]
    keyed = {}
    for row in rows:
        keyed.setdefault((row["layer"], row["target"]), {})[row["chain"]] = row["relative_error"]
    for (layer, target), by_chain in keyed.items():
        best = min(by_chain.values())
        cells = [f"**{by_chain[c]:.4f}**" if by_chain[c] == best else f"{by_chain[c]:.4f}" for c in chains]
        lines.append(f"| {layer.removeprefix('model.layers.')} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nRelative error = ||W X - Ŵ X||² / ||W X||² with each chain's weights (mask-only "
                               "chains keep w ⊙ m); bold: lowest in the row.")


def main() -> None:
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=Path, required=True, help="from benchmarks/experiments/export_layers.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tensors = load_file(str(args.layers))
    rows = []
    for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        rows += measure(name, tensors[f"{name}.weight"].float(), tensors[f"{name}.gram"].float())
    args.out.write_text(json.dumps({"rows": rows, "swap_options": SWAPS, "environment": environment()}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
