"""Does this tree's `refit_swap_rows` take the swaps of an earlier commit's, and how long does each take?
Real layers, on this machine.

The earlier module is read from git (its solver registered under another name so both load), and both
refine a warm start's mask (ALPS's unless --warm-start says otherwise) on every layer of a file from
export_layers.py with the same settings (λ = 1e-6 and at most 20 swaps per row unless --damping and
--max-iters say otherwise, --diagonal-damping for the *_diag chains), one after the other in this process.

    python benchmarks/experiments/refit_swaps_against_commit.py --commit 8780c0a --real-layers layers.safetensors --rows 48
    python benchmarks/experiments/refit_swaps_against_commit.py --commit bd08c6b --synthetic 64 --warm-start wanda \
        --device cuda --repeat 2
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import tempfile
import time
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparseswaps as ss  # noqa: E402
from bench_refit_swaps import layers, problem_for  # noqa: E402
from sparseswaps.solvers.refit_swaps import refit_swap_rows  # noqa: E402


def module_at(commit: str, source_file: Path | None = None, triton_file: Path | None = None) -> types.ModuleType:
    """refit_swaps.py at `commit` with that commit's refit_triton.py where it imports one, from git or, where
    the tree travels without its git history, from the files saved with git show."""
    source = source_file.read_text() if source_file else git_show(commit, "refit_swaps.py")
    module = types.ModuleType(f"refit_swaps_{commit}")
    module.__dict__["__name__"] = f"sparseswaps.solvers.refit_swaps_{commit}"
    module.__dict__["__package__"] = "sparseswaps.solvers"
    imports = re.search(r"^from \. import (.*refit_triton.*)$", source, re.MULTILINE)
    if imports:                                   # that commit's kernel, the other modules this tree's
        module.__dict__["refit_triton"] = kernels_at(commit, triton_file)
        others = [name.strip() for name in imports.group(1).split(",") if name.strip() != "refit_triton"]
        source = source.replace(imports.group(0), f"from . import {', '.join(others)}" if others else "")
    exec(compile(source.replace('@register("refit_swaps")', f'@register("refit_swaps_{commit}")'),
                 f"{commit}:refit_swaps.py", "exec"), module.__dict__)
    return module


def kernels_at(commit: str, triton_file: Path | None) -> types.ModuleType:
    """refit_triton.py at `commit`, imported from a file: Triton reads a kernel's source from its file."""
    if triton_file is None:
        triton_file = Path(tempfile.mkdtemp()) / f"refit_triton_{commit}.py"
        triton_file.write_text(git_show(commit, "refit_triton.py"))
    spec = importlib.util.spec_from_file_location(f"refit_triton_{commit}", triton_file)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    return kernels


def git_show(commit: str, name: str) -> str:
    return subprocess.run(["git", "show", f"{commit}:sparseswaps/solvers/{name}"], check=True, capture_output=True,
                          text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--real-layers", type=Path)
    parser.add_argument("--synthetic", type=int, metavar="ROWS",
                        help="ROWS rows of two Llama-3-8B-shaped synthetic layers instead (4096 and 14336 inputs)")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--targets", default="0.5,2:4")
    parser.add_argument("--source", type=Path, help="that commit's refit_swaps.py, saved with git show")
    parser.add_argument("--source-triton", type=Path, help="that commit's refit_triton.py, saved with git show")
    parser.add_argument("--max-iters", type=int, default=20)
    parser.add_argument("--warm-start", default="alps", help="the solver whose mask both refine")
    parser.add_argument("--damping", type=float, default=1e-6, help="λ as a share of mean diag G")
    parser.add_argument("--diagonal-damping", type=float, default=0.0, help="as run_pruning's *_diag chains")
    parser.add_argument("--batch-rows", type=int, help="rows refined together (default: the solver's budget)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each version; the fastest is reported "
                        "(2 on CUDA: the first compiles the fused scan)")
    args = parser.parse_args()
    if not (args.real_layers or args.synthetic):
        parser.error("give --real-layers FILE or --synthetic ROWS")
    old = module_at(args.commit, args.source, args.source_triton)
    for name, target, problem, start, group in cases(args):
        options = (problem.weight, problem.gram, start, args.max_iters, group, args.damping, args.batch_rows)
        extra = {"diagonal_damping": args.diagonal_damping}
        then, then_s = timed(args.repeat, old.refit_swap_rows, *options, **extra)
        now, now_s = timed(args.repeat, refit_swap_rows, *options, **extra)
        print(f"{name} {target}: same masks {torch.equal(then[0], now[0])}, same swaps per row "
              f"{torch.equal(then[1], now[1])}, {int(now[1].sum())} swaps, {then_s:.2f} s then, "
              f"{now_s:.2f} s now", flush=True)


def cases(args):
    """(layer name, target, problem, the warm start's mask, N:M group or None) for every layer asked for (the
    real ones' first --rows rows, or --synthetic rows of 8B widths) and every target."""
    for name, weight, gram in layers(None if args.synthetic else args.real_layers, args.rows, args.synthetic,
                                     args.device):
        for target in args.targets.split(","):
            problem = problem_for(weight, gram, target)
            group = problem.pattern.m if ":" in target else None
            yield name, target, problem, ss.solve(problem, args.warm_start).mask, group


def timed(repeat: int, function, *args, **options):
    """(result, fastest seconds of `repeat` runs)."""
    seconds = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = function(*args, **options)
        if result[0].is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - began)
    return result, min(seconds)


if __name__ == "__main__":
    main()
