"""Zero-shot accuracy through lm-evaluation-harness on the in-memory model, offline.

The task definitions in sparseswaps/tasks reproduce the official lm-eval tasks' prompts, choices, targets
and metrics on data files shipped with the package (see sparseswaps/tasks/README.md). Only those tasks are
indexed (include_defaults=False), so nothing is looked up on a hub.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

TASK_DIR = Path(__file__).parent / "tasks"
# Items per task in the official splits (sparseswaps/tasks/README.md); reported runs must match them.
OFFICIAL_ITEMS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                  "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838}
STANDARD_SEVEN = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def check_tasks(tasks) -> tuple[str, ...]:
    unknown = [t for t in tasks if t not in OFFICIAL_ITEMS]
    if unknown:
        raise UserError(f"unknown zero-shot task {', '.join(unknown)}; choose from {', '.join(OFFICIAL_ITEMS)}")
    return tuple(tasks)


def zero_shot(model, tokenizer, tasks, device, *, batch_size: int | str = "auto", limit: int | None = None) -> dict:
    """{task: {metric: value, metric_stderr: value, items: n, full_split: bool}, "mean_acc": ...}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("zero-shot evaluation needs lm-evaluation-harness: pip install -e '.[eval]' "
                        "(or pip install lm-eval)") from None
    tasks = check_tasks(tasks)
    model.to(device)
    language_model = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    output = simple_evaluate(model=language_model, tasks=list(tasks), task_manager=manager, limit=limit,
                             log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                             torch_random_seed=0)
    results = {}
    for task in tasks:
        metrics = output["results"][task]
        items = output["n-samples"][task]["effective"]
        entry = {"items": items, "full_split": items == OFFICIAL_ITEMS[task] and limit is None}
        for key, value in metrics.items():
            if key.startswith(("acc", "acc_norm")):
                entry[key.replace(",none", "")] = value
        results[task] = entry
    accuracies = [results[t]["acc"] for t in tasks]
    results["mean_acc"] = sum(accuracies) / len(accuracies)
    return results


def zero_shot_table(columns: dict[str, dict]) -> str:
    """Markdown: one column per evaluated model, acc (acc_norm where the task reports it) per task, and the mean."""
    names = list(columns)
    tasks = [t for t in OFFICIAL_ITEMS if any(t in c for c in columns.values())]
    lines = ["| task | items | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for task in tasks:
        cells = []
        for name in names:
            entry = columns[name].get(task)
            if entry is None:
                cells.append("-")
            else:
                norm = f" ({entry['acc_norm']:.3f})" if "acc_norm" in entry else ""
                cells.append(f"{entry['acc']:.3f}{norm}")
        items = next(columns[n][task]["items"] for n in names if task in columns[n])
        lines.append(f"| {task} | {items} | " + " | ".join(cells) + " |")
    lines.append(f"| mean acc ({len(tasks)} tasks) | | " + " | ".join(f"{columns[n]['mean_acc']:.3f}" for n in names) + " |")
    if set(STANDARD_SEVEN) < set(tasks):   # the papers' mean leaves PIQA out
        means = [sum(columns[n][t]["acc"] for t in STANDARD_SEVEN) / len(STANDARD_SEVEN) for n in names]
        lines.append("| mean acc (standard seven) | | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)
