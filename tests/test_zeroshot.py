"""Zero-shot task definitions: official item counts, official prompts, and the lm-eval plumbing."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from sparseswaps.zeroshot import OFFICIAL_ITEMS, TASK_DIR, zero_shot_table

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
# Where lm-eval keeps each official task definition.
OFFICIAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml", "boolq": "super_glue/boolq/default.yaml",
                 "rte": "glue/rte/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                 "winogrande": "winogrande/default.yaml"}
COMPARED = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice")


class _TaggedLoader(yaml.SafeLoader):
    pass


_TaggedLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_TaggedLoader)


def test_every_task_loads_its_official_item_count():
    from sparseswaps.tasks import utils

    assert utils.item_counts() == OFFICIAL_ITEMS


@needs_lm_eval
@pytest.mark.parametrize("task", sorted(OFFICIAL_ITEMS))
def test_prompts_choices_targets_and_metrics_are_the_official_ones(task):
    import lm_eval

    ours = read_yaml(TASK_DIR / f"{task}.yaml")
    official = read_yaml(Path(lm_eval.__file__).parent / "tasks" / OFFICIAL_YAML[task])
    for field in COMPARED:
        if str(official[field]).startswith("!function"):   # winogrande: ours delegates to lm-eval's function
            assert ours[field].startswith("!function utils.winogrande")
        else:
            assert ours[field] == official[field], field
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in official["metric_list"]]
    if "process_docs" in official:
        assert ours["process_docs"] == "!function utils.hellaswag_docs"


@needs_lm_eval
def test_every_task_runs_through_lm_eval_on_a_tiny_model():
    from sparseswaps.zeroshot import zero_shot
    from tiny_models import tiny_model, tiny_tokenizer

    results = zero_shot(tiny_model("llama"), tiny_tokenizer(), list(OFFICIAL_ITEMS), "cpu", batch_size=4, limit=2)
    for task in OFFICIAL_ITEMS:
        assert results[task]["items"] == 2 and not results[task]["full_split"]
        assert 0 <= results[task]["acc"] <= 1
    assert 0 <= results["mean_acc"] <= 1


def test_table_reports_the_mean_over_all_tasks_and_over_the_standard_seven():
    column = {task: {"acc": 0.5, "items": items} for task, items in OFFICIAL_ITEMS.items()}
    column["piqa"]["acc"] = 0.9
    column["mean_acc"] = sum(entry["acc"] for entry in column.values()) / len(OFFICIAL_ITEMS)
    lines = zero_shot_table({"model": column}).splitlines()
    assert lines[-2] == "| mean acc (8 tasks) | | 0.550 |"
    assert lines[-1] == "| mean acc (standard seven) | | 0.500 |"
