"""Does this tree's `refit_swap_rows` take the swaps of an earlier commit's? Real layers, on this machine.

The earlier module is read from git (its solver registered under another name so both load), and both
refine ALPS's mask on every layer of a file from export_layers.py with the committed chain's settings
(λ = 1e-6, at most 20 swaps per row).

    python benchmarks/experiments/refit_swaps_against_commit.py --commit 8780c0a --real-layers layers.safetensors --rows 48
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sparseswaps as ss  # noqa: E402
from sparseswaps.solvers.refit_swaps import refit_swap_rows  # noqa: E402


def module_at(commit: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{commit}:sparseswaps/solvers/refit_swaps.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"refit_swaps_{commit}")
    module.__dict__["__name__"] = f"sparseswaps.solvers.refit_swaps_{commit}"
    module.__dict__["__package__"] = "sparseswaps.solvers"
    exec(compile(source.replace('@register("refit_swaps")', f'@register("refit_swaps_{commit}")'),
                 f"{commit}:refit_swaps.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--real-layers", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--targets", default="0.5,2:4")
    args = parser.parse_args()
    from safetensors.torch import load_file

    old = module_at(args.commit)
    tensors = load_file(str(args.real_layers))
    for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        for target in args.targets.split(","):
            spec = {"pattern": target} if ":" in target else {"sparsity": float(target)}
            problem = ss.MaskProblem(tensors[f"{name}.weight"][:args.rows].float(), tensors[f"{name}.gram"].float(),
                                     check_psd=False, **spec)
            start = ss.solve(problem, "alps").mask
            group = problem.pattern.m if ":" in target else None
            then = old.refit_swap_rows(problem.weight, problem.gram, start, 20, group, 1e-6)
            now = refit_swap_rows(problem.weight, problem.gram, start, 20, group, 1e-6)
            print(f"{name} {target}: same masks {torch.equal(then[0], now[0])}, same swaps per row "
                  f"{torch.equal(then[1], now[1])}, {int(now[1].sum())} swaps", flush=True)


if __name__ == "__main__":
    main()
