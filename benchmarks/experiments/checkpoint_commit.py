"""Blocking time of one 8B-shaped block's checkpoint commit (463 MB of bf16 weights and their masks) here.

`DiskStore.commit` returns once the tensors are snapshot to the CPU and the masks packed; the write
(serialisation, fsync, SHA-256) runs on the writer thread while the next block is computed.

    python benchmarks/experiments/checkpoint_commit.py    # output: results/streaming/checkpoint_commit_cpu.txt
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparseswaps.checkpoint import DiskStore  # noqa: E402

# q, k, v, o, gate, up, down of a Llama-3-8B block
SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def main() -> None:
    tensors = {f"layer{i}.weight": torch.randn(shape).bfloat16() for i, shape in enumerate(SHAPES)}
    masks = {f"layer{i}": torch.rand(shape) < 0.5 for i, shape in enumerate(SHAPES)}
    store = DiskStore.open(Path(tempfile.mkdtemp()) / "checkpoint", "experiment", resume=False)
    for index in range(3):
        started = time.perf_counter()
        store.commit(index, tensors, masks, {"block": index})
        blocking = time.perf_counter() - started
        started = time.perf_counter()
        store.wait()
        print(f"block {index}: commit returned after {blocking:.2f} s; the write needed "
              f"{time.perf_counter() - started:.2f} s more, overlapping the next block")
    store.finish()


if __name__ == "__main__":
    main()
