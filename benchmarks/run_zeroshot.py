"""Zero-shot accuracy of the dense model and of Wanda vs Wanda+SparseSwaps (paper protocol) on the full splits.

One JSON accumulates every run (runs already in it are skipped); a markdown table with the mean accuracy is
written beside it.

    python benchmarks/run_zeroshot.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out results/zeroshot_smollm2.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_pruning import METHODS, grouped_bars, matrix_parser, method_config  # noqa: E402
from sparseswaps.models import load_model  # noqa: E402
from sparseswaps.pipeline import PruneConfig, prune_model  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402
from sparseswaps.zeroshot import OFFICIAL_ITEMS, zero_shot, zero_shot_table  # noqa: E402


def plot(columns: dict[str, dict], path: Path) -> None:
    """Accuracy per task for every evaluated model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in OFFICIAL_ITEMS if all(t in c for c in columns.values())]
    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(tasks)) + 1.8, 3.8))
    grouped_bars(axis, tasks, {name: [column[t]["acc"] for t in tasks] for name, column in columns.items()})
    axis.tick_params(axis="x", labelrotation=20)
    axis.set_ylabel("accuracy")
    axis.set_title("Zero-shot accuracy (full splits)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))   # outside: bars fill the axes
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = matrix_parser(__doc__, "wanda,wanda+swaps")
    parser.add_argument("--tasks", default=",".join(OFFICIAL_ITEMS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, help="items per task: plumbing checks only")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    store = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}, "environment": environment()}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(store, indent=1, default=str))
        columns = {name: run["zero_shot"] for name, run in store["runs"].items()}
        args.out.with_suffix(".md").write_text(f"# Zero-shot accuracy (acc, acc_norm in brackets)\n\n"
                                               f"{zero_shot_table(columns)}\n")
        plot(columns, args.out.with_suffix(".png"))

    if args.merge:
        for shard in args.merge:
            store["runs"].update(json.loads(shard.read_text())["runs"])
        save()
        print(args.out.with_suffix(".md").read_text())
        return
    if "dense" not in store["runs"]:
        config = PruneConfig(model=args.model, tokenizer=args.tokenizer, device=args.device).resolved()
        model, tokenizer, info = load_model(args.model, tokenizer=args.tokenizer)
        store["runs"]["dense"] = {"model": info, "zero_shot": zero_shot(model, tokenizer, tasks, config.device,
                                                                         limit=args.limit)}
        save()
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            name = f"{method} {target}"
            if name in store["runs"]:
                continue
            config = method_config(method, target, model=args.model, tokenizer=args.tokenizer,
                                   protocol=args.protocol, device=args.device, eval=(), zero_shot=tuple(tasks),
                                   zero_shot_limit=args.limit)
            result = prune_model(config, checkpointing=False)
            store["runs"][name] = {"config": result["config"], "summary": result["summary"],
                                   "zero_shot": result["zero_shot"]}
            save()
            print(f"{name}: mean acc {result['zero_shot']['mean_acc']:.4f}", flush=True)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
