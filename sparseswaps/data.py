"""Corpora for calibration and perplexity, shipped byte-exact in sparseswaps/data (see its README).

Loaded through `datasets`' "text" and "json" builders and tokenised as SparseGPT and Wanda do:
- WikiText-2 test: rows as Hugging Face's wikitext-2-raw-v1 (one per line, newline kept, whitespace-only
  lines empty), joined with "\\n\\n".
- PTB test: rows as ptb_text_only (lines stripped), joined with " ".
- C4 validation: the first 1,100 documents of shard 0 joined with " ", cut to 256 x seqlen tokens. The
  shipped file holds the first 1,025 documents; the token count actually used is recorded.
- Calibration: C4 train shard 0, Wanda's sampler (Python `random` seeded; draw a document until one is
  longer than seqlen tokens, then a random window of seqlen tokens). The shipped pool is its first 1,041
  documents, so the windows are not the papers' own.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

DATA_DIR = Path(__file__).parent / "data"

CORPORA = {
    "wikitext2": ("wikitext2/wiki.test.raw", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    "ptb": ("ptb/ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    "c4": ("c4/c4-validation.00000-of-00008.head1025.jsonl.gz",
           "038ba4d1ffe134a93e0504100ab873c5ff5b9d8af28866740ddf822bf3d5b6ec"),
    "c4-train": ("c4/c4-train.00000-of-01024.head1041.jsonl.gz",
                 "6b1a44a29595c18e0eccdbbd2db1c2c9781fb5748d515af2c237c045d7c55fda"),
}
EVAL_CORPORA = ("wikitext2", "c4", "ptb")
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256


def corpus_file(name: str) -> Path:
    """The shipped file of a corpus, after checking its SHA-256."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    relative, expected = CORPORA[name]
    path = DATA_DIR / relative
    if not path.is_file():
        raise UserError(f"corpus file {path} is missing: reinstall sparseswaps from a full checkout")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise UserError(f"corpus file {path} has SHA-256 {digest}, expected {expected}: it was modified "
                        "(line-ending conversion?); restore it from the repository")
    return path


def provenance(names) -> dict:
    """File, SHA-256 and byte size of each corpus used: recorded in every result file."""
    return {name: {"file": CORPORA[name][0], "sha256": CORPORA[name][1],
                   "bytes": corpus_file(name).stat().st_size} for name in names}


def _rows(name: str) -> list[str]:
    from datasets import load_dataset

    path = str(corpus_file(name))
    if name in ("c4", "c4-train"):
        return list(load_dataset("json", data_files=path, split="train")["text"])
    lines = load_dataset("text", data_files=path, split="train", keep_linebreaks=True)["text"]
    if name == "wikitext2":
        return [line if line.strip() else "" for line in lines]
    return [line.strip() for line in lines]


def evaluation_text(name: str) -> str:
    rows = _rows(name)
    if name == "wikitext2":
        return "\n\n".join(rows)
    if name == "ptb":
        return " ".join(rows)
    if name == "c4":
        return " ".join(rows[:C4_EVAL_DOCUMENTS])
    raise UserError(f"{name!r} is not an evaluation corpus; choose from {', '.join(EVAL_CORPORA)}")


@dataclass
class Windows:
    """Non-overlapping evaluation windows [count, seqlen] and how they were made."""

    input_ids: torch.Tensor
    info: dict


def evaluation_windows(name: str, tokenizer, seqlen: int, *, bos_per_window: bool = False,
                       max_windows: int | None = None) -> Windows:
    """Tokenise an evaluation corpus as SparseGPT/Wanda do and cut it into windows of `seqlen` tokens.

    With `bos_per_window` every window starts with the BOS token followed by seqlen - 1 text tokens
    (Gemma needs it); otherwise the text is tokenised once and cut (BOS, if the tokenizer adds one, only
    at the start of the first window), as in the papers.
    """
    _check_seqlen(seqlen)
    text = evaluation_text(name)
    if bos_per_window:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        step = seqlen - 1
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        step = seqlen
    available = len(ids)
    if name == "c4":
        ids = ids[: C4_EVAL_WINDOWS * step]
    count = len(ids) // step
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"corpus {name!r} has {available} tokens, fewer than one window of {seqlen}: "
                        "choose a smaller --seqlen")
    windows = ids[: count * step].view(count, step)
    if bos_per_window:
        bos = torch.full((count, 1), _bos_id(tokenizer), dtype=windows.dtype)
        windows = torch.cat([bos, windows], dim=1)
    info = {"corpus": name, "windows": count, "seqlen": seqlen, "tokens_in_corpus": available,
            "bos_per_window": bos_per_window, "max_windows": max_windows}
    if name == "c4" and available < C4_EVAL_WINDOWS * step:
        info["note"] = (f"the shipped C4 validation head has {available} tokens, fewer than the protocol's "
                        f"{C4_EVAL_WINDOWS} windows of {seqlen}")
    return Windows(windows, info)


def calibration_windows(tokenizer, nsamples: int, seqlen: int, seed: int = 0, *,
                        bos_per_window: bool = False) -> Windows:
    """Wanda's C4 sampler on the shipped train pool: `nsamples` random windows of `seqlen` tokens."""
    _check_seqlen(seqlen)
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    documents = _rows("c4-train")
    special = not bos_per_window
    encoded = tokenizer(documents, add_special_tokens=special).input_ids
    text_len = seqlen - 1 if bos_per_window else seqlen
    if not any(len(ids) > text_len for ids in encoded):
        longest = max(len(ids) for ids in encoded)
        raise UserError(f"no calibration document is longer than --seqlen {seqlen} tokens (longest: {longest}): "
                        "choose a smaller --seqlen")
    rng = random.Random(seed)
    samples, sources = [], []
    for _ in range(nsamples):
        while True:   # the same sequence of draws as Wanda's get_c4
            index = rng.randint(0, len(documents) - 1)
            if len(encoded[index]) > text_len:
                break
        start = rng.randint(0, len(encoded[index]) - text_len - 1)
        window = encoded[index][start:start + text_len]
        if bos_per_window:
            window = [_bos_id(tokenizer)] + window
        samples.append(window)
        sources.append(index)
    info = {"corpus": "c4-train", "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "distinct_documents": len(set(sources)), "documents": sorted(set(sources)),
            "bos_per_window": bos_per_window}
    return Windows(torch.tensor(samples, dtype=torch.long), info)


def _bos_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise UserError("bos_per_window needs a tokenizer with a BOS token")
    return tokenizer.bos_token_id


def _check_seqlen(seqlen: int) -> None:
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 tokens, got {seqlen}")
