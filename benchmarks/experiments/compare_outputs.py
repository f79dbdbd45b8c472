"""Compare two outputs of compare_with_commit.py: perplexities, per-layer objectives and swaps, masks."""
import json
import sys

import torch

first, second = sys.argv[1], sys.argv[2]
runs = [json.load(open(f"{folder}/r.json")) for folder in (first, second)]
print("ppl equal:", runs[0]["ppl"] == runs[1]["ppl"], runs[0]["ppl"]["pruned"], runs[1]["ppl"]["pruned"])
layers = [{row[0]: row[1:] for row in run["layers"]} for run in runs]
differing = [name for name in layers[0] if layers[0][name] != layers[1][name]]
print("layers differing:", len(differing), "of", len(layers[0]), differing[:3])
masks = [torch.load(f"{folder}/masks.pt") for folder in (first, second)]
print("masks equal:", all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0]),
      "seconds", runs[0]["seconds"], runs[1]["seconds"])
