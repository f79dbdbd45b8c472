"""Loaders for the shipped zero-shot files (lm-eval `custom_dataset` functions).

Each returns the split lm-eval scores, in the schema of the Hugging Face dataset the official task reads,
so the task YAMLs beside this file keep the official prompts, choices, targets and metrics unchanged.
lm-eval imports this file by path, so it is self-contained.
"""
import hashlib
import json
from pathlib import Path

import datasets

DATA = Path(__file__).parent / "data"
SHA256 = {
    "arc/ARC-Challenge-Test.jsonl": "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    "arc/ARC-Easy-Test.jsonl": "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    "openbookqa/test.jsonl": "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313",
    "superglue/BoolQ/val.jsonl.gz": "3746452877261a06cff649df091baa33374f114508a0660f519a705bd4e2cec4",
    "superglue/RTE/val.jsonl": "ab990507bf5f35dc176cba7770a72bfa2c50a88ed72b8cc95cfbf9db95ab1af1",
    "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "hellaswag/hellaswag_val.hf-reserialized.jsonl.gz": "8c0a4bc44ab7245773e8e14e6630db0319fd0e9ba5cf53467a1e3d629f7c7ad7",
    "winogrande/dev.hf-winogrande_xl-validation.jsonl": "34f0a22749f3986249b0629ff05ae298ebb2b14f93ac8499aa673626548626c7",
}


def _file(relative: str) -> str:
    path = DATA / relative
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[relative]:
        raise ValueError(f"{path} has SHA-256 {digest}, expected {SHA256[relative]}: restore it from the repository")
    return str(path)


def _json(relative: str) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=_file(relative), split="train")


def _split(name: str, dataset: datasets.Dataset) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: dataset})


def _multiple_choice(doc):
    """ARC / OpenBookQA release schema -> the Hugging Face schema (choices as parallel lists)."""
    return {"choices": {"text": [c["text"] for c in doc["question"]["choices"]],
                        "label": [c["label"] for c in doc["question"]["choices"]]}}


def _arc(relative):
    raw = _json(relative)
    return _split("test", raw.map(lambda doc: {"question": doc["question"]["stem"], **_multiple_choice(doc)},
                                  remove_columns=["question"]))


def arc_easy(**_):
    return _arc("arc/ARC-Easy-Test.jsonl")


def arc_challenge(**_):
    return _arc("arc/ARC-Challenge-Test.jsonl")


def openbookqa(**_):
    raw = _json("openbookqa/test.jsonl")
    return _split("test", raw.map(lambda doc: {"question_stem": doc["question"]["stem"], **_multiple_choice(doc)},
                                  remove_columns=["question"]))


def boolq(**_):
    # SuperGLUE stores label as the strings "true"/"false"; Hugging Face's super_glue uses 1/0.
    raw = _json("superglue/BoolQ/val.jsonl.gz")
    return _split("validation", raw.map(lambda doc: {"label": int(doc["label"] in (True, "true"))}))


def rte(**_):
    # lm-eval's `rte` reads GLUE's RTE (sentence1, sentence2, label 0 = entailment): the same 277 items.
    raw = _json("superglue/RTE/val.jsonl")
    return _split("validation", raw.map(
        lambda doc: {"sentence1": doc["premise"], "sentence2": doc["hypothesis"],
                     "label": 0 if doc["label"] == "entailment" else 1},
        remove_columns=["premise", "hypothesis", "label"]))


def piqa(**_):
    labels = [int(line) for line in Path(_file("piqa/valid-labels.lst")).read_text().split()]
    return _split("validation", _json("piqa/valid.jsonl").add_column("label", labels))


def hellaswag(**_):
    return _split("validation", _json("hellaswag/hellaswag_val.hf-reserialized.jsonl.gz"))


def winogrande(**_):
    return _split("validation", _json("winogrande/dev.hf-winogrande_xl-validation.jsonl"))


def hellaswag_docs(dataset):
    from lm_eval.tasks.hellaswag.utils import process_docs
    return process_docs(dataset)


def winogrande_text(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text
    return doc_to_text(doc)


def winogrande_target(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target
    return doc_to_target(doc)


def winogrande_choice(doc):
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice
    return doc_to_choice(doc)


def item_counts() -> dict:
    """Items per task as loaded (for the tests and the result files)."""
    loaders = {"arc_easy": arc_easy, "arc_challenge": arc_challenge, "openbookqa": openbookqa, "boolq": boolq,
               "rte": rte, "piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande}
    return {name: len(next(iter(loader().values()))) for name, loader in loaders.items()}


if __name__ == "__main__":
    print(json.dumps(item_counts()))
