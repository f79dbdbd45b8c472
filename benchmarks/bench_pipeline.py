"""The whole pruning run at LLM scale: Llama-3-8B- and -70B-shaped models through the real CLI.

The models have the real shapes (hidden 4096 / MLP 14336 / 32 heads, 8 KV heads, 32 blocks; hidden 8192 /
MLP 28672 / 64 heads, 8 KV heads, a few of the 80 blocks) and random weights from a config, written as
sharded bf16 safetensors: right for time and memory, meaningless for perplexity. Each method runs as
`python -m sparseswaps prune` in its own process, so its peak host RSS is its own; the JSON keeps, per run,
the shape, the blocks, the method, pruning seconds, peak host and GPU memory and the per-block stages
(load, Gram accumulation, solve, propagation, checkpoint) from the run's own report.

    python benchmarks/bench_pipeline.py --tokenizer TOKDIR --work /tmp/bench --out benchmarks/results/bench_pipeline.json
    python benchmarks/bench_pipeline.py --shape tiny --tokenizer TOKDIR ...   # a CPU smoke run

Any tokenizer serves random weights (SmolLM2's is 3.4 MB): its ids are below every shape's vocabulary.
The 70B-shaped whole-model time is extrapolated from the measured blocks (80 / blocks times the block
loop) and says so. `--method-timeout S` stops a method's run after S seconds and records it as stopped, a
lower bound on its time.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_pruning import METHODS  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, full_blocks=32),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, full_blocks=80),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=49152, full_blocks=2),
}


def method_arguments(method: str) -> list[str]:
    """The prune command's arguments for one of run_pruning's methods (warm start, solver, its options, re-fit)."""
    chosen = METHODS[method]
    return (["--warm-start", chosen.warm or "none", "--solver", chosen.solver]
            + sum((["--solver-option", f"{key}={value}"] for key, value in chosen.options.items()), [])
            + (["--update-weights"] if chosen.update_weights else []))


def uses_swaps(solver: str) -> bool:
    """Whether the solver is a swaps solver, the one the --solver-option flags are for."""
    return solver in ("swaps", "refit_swaps")


def llama_config(shape: str, blocks: int):
    from transformers import LlamaConfig

    dims = {k: v for k, v in SHAPES[shape].items() if k != "full_blocks"}
    return LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16", **dims)


def build_random_model(shape: str, blocks: int, folder: Path, tokenizer: Path, device: str) -> Path:
    """A sharded bf16 checkpoint (one shard per block) of random weights, std 0.02 and unit norms as
    transformers initialises them, drawn on `device` one block at a time."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    config = llama_config(shape, blocks)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, parameter in skeleton.named_parameters():
        key = name.split(".")[2] if name.startswith("model.layers.") else "outer"
        groups.setdefault(key, []).append((name, parameter.shape))
    generator = torch.Generator(device).manual_seed(0)
    weight_map = {}
    for shard, (key, members) in enumerate(groups.items()):
        tensors = {}
        for name, shape_ in members:
            if len(shape_) == 1:
                tensors[name] = torch.ones(shape_, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape_, generator=generator, device=device) * 0.02).bfloat16().cpu()
        filename = f"model-{shard + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(partial / filename), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, filename)
    (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(partial)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(partial)
    partial.rename(folder)
    return folder


def launcher(ranks: int) -> list[str]:
    """A plain process (ranks 0), or torchrun with that many ranks on this node (one GPU each)."""
    if ranks == 0:
        return [sys.executable, "-m", "sparseswaps"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "sparseswaps"]


def run_method(model: Path, method: str, args, work: Path, ranks: int = 0, blocks: int = 0) -> dict:
    out = work / f"{model.name}-{method.replace('+', '_')}.json"
    if out.exists():
        out.unlink()
    command = [*launcher(ranks), "prune", "--model", str(model), *method_arguments(method),
               "--protocol", args.protocol, "--eval", args.eval, "--eval-windows", str(args.eval_windows),
               "--out", str(out), *sum((["--solver-option", o] for o in args.solver_option
                                        if uses_swaps(METHODS[method].solver)), [])]
    if args.nsamples:
        command += ["--nsamples", str(args.nsamples)]
    started = time.perf_counter()
    if not finished(command, args.method_timeout):
        return stopped_run(method, args, blocks, ranks)
    wall = time.perf_counter() - started
    report = json.loads(out.read_text())
    out.unlink()
    out.with_suffix(".png").unlink(missing_ok=True)
    return {**summarise(report, method, wall), "ranks": ranks}


def finished(command: list[str], timeout: float | None) -> bool:
    """Run the command; False if it was stopped after `timeout` seconds (its whole process group: torchrun's
    ranks too)."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return False
    if code:
        raise subprocess.CalledProcessError(code, command)
    return True


def stopped_run(method: str, args, blocks: int, ranks: int) -> dict:
    """The record of a run stopped by --method-timeout: what it was and how long it had."""
    from sparseswaps.registry import parse_option_values

    chosen = METHODS[method]
    options = {**chosen.options, **(parse_option_values(args.solver_option, "--solver-option")
                                    if uses_swaps(chosen.solver) else {})}
    return {"method": method, "blocks": blocks, "ranks": ranks, "stopped_after_s": args.method_timeout,
            "config": {"solver": chosen.solver, "warm_start": chosen.warm, "solver_options": options}}


def summarise(report: dict, method: str, wall: float) -> dict:
    blocks = report["blocks"]
    stages = {stage: sum(block[stage] for block in blocks) for stage in
              ("load_s", "gram_s", "solve_s", "propagate_s", "checkpoint_s")}
    return {"method": method, "blocks": len(blocks), "pruning_seconds": report["summary"]["pruning_seconds"],
            "outside_solver_share": 1 - stages["solve_s"] / report["summary"]["pruning_seconds"],
            "stage_seconds": stages, "peak_host_gib": report["summary"]["peak_host_gib"],
            "peak_gpu_gib": report["summary"]["peak_gpu_gib"], "wall_s": wall,
            "perplexity_random_weights": {k: v["ppl"] for k, v in report["perplexity"]["pruned"].items()},
            "scan_dtypes": sorted({row.get("scan_dtype") for row in report["layers"] if row.get("scan_dtype")}),
            "mean_reduction": report["summary"]["mean_reduction"], "config": report["config"],
            "per_block": blocks, "environment": report["environment"]}


def sizes(shape: str, blocks: int, nsamples: int, seqlen: int) -> dict:
    dims = SHAPES[shape]
    h, m, kv = dims["hidden_size"], dims["intermediate_size"], dims["num_key_value_heads"]
    head = h // dims["num_attention_heads"]
    block_params = 2 * h * h + 2 * h * kv * head + 3 * h * m + 2 * h
    return {"block_gib": block_params * 2 / 2**30, "calibration_activations_gib": nsamples * seqlen * h * 2 / 2**30}


def swap_setting(solver: str, options: dict) -> str:
    cap = options.get("max_iters")
    if solver == "refit_swaps":
        return f" (≤ {cap} swaps/row)" if cap is not None else " (the solver's swap cap)"
    per_scan = options.get("swaps_per_scan", 1)
    return f" (≤ {cap} scans, {per_scan} swap{'s' if per_scan > 1 else ''}/scan)"


def table(runs: list[dict]) -> str:
    lines = ["| model shape | blocks | method | ranks | pruning s | scaling efficiency | outside solver | load | Gram | "
             "solve | propagate | checkpoint | peak host GiB | peak GPU GiB (rank 0) | 3 blocks + activations GiB | "
             "scan dtype |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        if "stopped_after_s" in run:
            lines.append(stopped_row(run))
            continue
        stage = run["stage_seconds"]
        gpu = "-" if run["peak_gpu_gib"] is None else f"{run['peak_gpu_gib']:.1f}"
        bound = 3 * run["sizes"]["block_gib"] + run["sizes"]["calibration_activations_gib"]
        lines.append(f"| {run['model_shape']} | {run['blocks']} | {method_label(run)} | {ranks_label(run)} | "
                     f"{run['pruning_seconds']:.1f} | {efficiency(run, runs)} | {run['outside_solver_share']:.0%} | {stage['load_s']:.1f} | {stage['gram_s']:.1f} | "
                     f"{stage['solve_s']:.1f} | {stage['propagate_s']:.1f} | {stage['checkpoint_s']:.1f} | "
                     f"{run['peak_host_gib']:.1f} | {gpu} | {bound:.1f} | {','.join(run['scan_dtypes']) or '-'} |")
    extrapolated = [r for r in runs if r["blocks"] < SHAPES[r["model_shape"]]["full_blocks"]]
    if extrapolated:
        lines.append("")
        for run in extrapolated:
            full = SHAPES[run["model_shape"]]["full_blocks"]
            if "stopped_after_s" in run:
                lines.append(f"- {run['model_shape']} {run['method']}: stopped after {run['stopped_after_s']:.0f} s "
                             f"(the whole process's wall time) before its {run['blocks']} of {full} blocks were done.")
                continue
            lines.append(f"- {run['model_shape']} {run['method']}: {run['blocks']} of {full} blocks measured; whole "
                         f"model extrapolated to {run['pruning_seconds'] * full / run['blocks'] / 60:.1f} min "
                         "(block loop scaled, not measured).")
    lines.append("\nRandom weights: perplexities are meaningless and not shown; time and memory are the point. "
                 "Ranks: 'process' is a plain process, N is torchrun with N ranks (one GPU each); scaling efficiency "
                 "is the 1-rank time over N times the N-rank time, same shape, blocks and method.")
    return "\n".join(lines)


def method_label(run: dict) -> str:
    """The method, with its swap cap for a swaps solver."""
    solver = run["config"]["solver"]
    return run["method"] + (swap_setting(solver, run["config"]["solver_options"]) if uses_swaps(solver) else "")


def stopped_row(run: dict) -> str:
    return (f"| {run['model_shape']} | {run['blocks']} | {method_label(run)} | {ranks_label(run)} | "
            f"> {run['stopped_after_s']:.0f} (stopped) |" + " - |" * 11)


def ranks_label(run: dict) -> str:
    return str(run.get("ranks") or "process")


def efficiency(run: dict, runs: list[dict]) -> str:
    ranks = run.get("ranks", 0)
    one = [r for r in runs if r.get("ranks") == 1 and same_setting(r, run) and "pruning_seconds" in r]
    if ranks < 2 or not one:
        return "-"
    return f"{one[0]['pruning_seconds'] / (ranks * run['pruning_seconds']):.0%}"


def same_setting(a: dict, b: dict) -> bool:
    return (a["model_shape"], a["blocks"], a["method"]) == (b["model_shape"], b["blocks"], b["method"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    parser.add_argument("--blocks", type=int, help="decoder blocks to build (default: all of the shape's)")
    parser.add_argument("--methods", default="wanda+swaps,wanda,sparsegpt")
    parser.add_argument("--tokenizer", type=Path, required=True, help="any tokenizer folder (save_pretrained)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the model and reports")
    parser.add_argument("--out", type=Path, required=True, help="JSON to append runs to (a .md table beside it)")
    parser.add_argument("--protocol", default="paper")
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--eval", default="", help="perplexity corpora ('' for none)")
    parser.add_argument("--eval-windows", type=int, default=0)
    parser.add_argument("--solver-option", action="append", default=[], help="for the swaps runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ranks", default="0", help="comma-separated torchrun rank counts to run each method "
                                                     "with, 0 for a plain process (default 0)")
    parser.add_argument("--method-timeout", type=float, help="seconds after which a method's run is stopped and "
                                                             "recorded as stopped (default: none)")
    args = parser.parse_args()
    blocks = args.blocks or SHAPES[args.shape]["full_blocks"]
    store = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    started = time.perf_counter()
    model = build_random_model(args.shape, blocks, args.work / f"{args.shape}-{blocks}", args.tokenizer, args.device)
    print(f"built {model} in {time.perf_counter() - started:.0f} s", flush=True)
    from sparseswaps.config import PROTOCOLS

    preset = PROTOCOLS[args.protocol]
    for method, ranks in [(m, int(r)) for m in args.methods.split(",") for r in args.ranks.split(",")]:
        run = run_method(model, method, args, args.work, ranks, blocks)
        run.update(model_shape=args.shape, sizes=sizes(args.shape, blocks, args.nsamples or preset["nsamples"],
                                                       preset["seqlen"]))
        store["runs"] = [r for r in store["runs"] if not (same_setting(r, run) and r.get("ranks", 0) == ranks)] + [run]
        args.out.write_text(json.dumps(store, indent=1))
        args.out.with_suffix(".md").write_text(table(store["runs"]) + "\n")
        print(f"{args.shape} {method} ranks {ranks_label(run)}: " + (
                  f"stopped after {run['stopped_after_s']:.0f} s" if "stopped_after_s" in run else
                  f"{run['pruning_seconds']:.1f} s pruning, peak host {run['peak_host_gib']:.1f} GiB"), flush=True)
    print(table(store["runs"]))


if __name__ == "__main__":
    main()
