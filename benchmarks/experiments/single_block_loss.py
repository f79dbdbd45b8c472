"""Prune one block's seven layers with each method and measure the whole model's loss on held-out text.

heldout_error.py compares methods layer by layer; this puts each method's weights for one whole block into
the otherwise dense model and measures the language-model loss on held-out windows (WikiText-2 validation
and C4 training documents the calibration never drew), so the block's layers act together through attention
and the MLP and through every later block, as in the full pipeline but with one block pruned. Every layer is
solved on the calibration Gram of the dense model's inputs, all rows.

    python benchmarks/experiments/single_block_loss.py --model gemma-3-270m-q4_k_m.gguf --tokenizer TOK \\
        --wikitext-valid ../shared/data/wikitext2/wiki.valid.raw --block 9 --out benchmarks/results/single_block_gemma3_b9_cpu.json
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparseswaps as ss  # noqa: E402
from heldout_error import block_grams, experiment_parser, model_and_windows, relative_error  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402

# label: (chain, options of its last stage)
CHAINS = {"alps": (["alps"], {}), "admm": (["admm"], {}),
          "alps + refit_swaps": (["alps", "refit_swaps"], {"damping": 1e-6}),
          "admm + refit_swaps on G + 0.1 diag G": (["admm", "refit_swaps"], {"diagonal_damping": 0.1}),
          "alps + refit_swaps on G + 0.01 diag G": (["alps", "refit_swaps"], {"diagonal_damping": 0.01})}


def heldout_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token loss over the windows (every window weighted alike)."""
    with torch.no_grad():
        return sum(float(model(window.unsqueeze(0), labels=window.unsqueeze(0), use_cache=False).loss)
                   for window in windows) / len(windows)


def pruned_weights(layers: dict, grams: dict, chain: list[str], options: dict, target: str) -> tuple[dict, float]:
    """Each layer's kept weights from `chain` and the mean relative calibration error."""
    spec = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    weights, errors = {}, []
    for name, layer in layers.items():
        weight = layer.weight.detach().double()
        problem = ss.MaskProblem(weight.float(), grams[name].float(), check_psd=False, **spec)
        result = ss.solve(problem, chain, **options)
        kept = result.weight.double() if result.weight is not None else weight * result.mask
        weights[name] = kept
        errors.append(relative_error(weight, kept, grams[name]))
    return weights, sum(errors) / len(errors)


def main() -> None:
    parser = experiment_parser(__doc__, block=9, targets="0.5", heldout=8)
    parser.add_argument("--methods", default=",".join(CHAINS), help="labels of CHAINS, comma-separated")
    args = parser.parse_args()
    model, _, info, layers, calibration, heldout = model_and_windows(args)
    first, rest = block_grams(model, args.block, layers, calibration.input_ids)
    grams = {name: first[name] + rest[name] for name in layers}
    dense = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    rows = [{"method": "dense", "target": None, "calibration_error": 0.0, "loss": heldout_loss(model, heldout)}]
    print(json.dumps(rows[-1]), flush=True)
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            began = time.perf_counter()
            weights, error = pruned_weights(layers, grams, *CHAINS[method], target)
            for name, layer in layers.items():
                layer.weight.data.copy_(weights[name].to(layer.weight.dtype))
            rows.append({"method": method, "target": target, "calibration_error": error,
                         "loss": heldout_loss(model, heldout), "seconds": time.perf_counter() - began})
            for name, layer in layers.items():
                layer.weight.data.copy_(dense[name])
            print(json.dumps(rows[-1]), flush=True)
            report = {"model": info, "block": args.block, "calibration": calibration.info,
                      "heldout_windows_per_corpus": args.heldout_windows, "rows": rows, "environment": environment()}
            args.out.write_text(json.dumps(report, indent=1))
            args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    dense = rows[0]["loss"]
    lines = ["| target | method | mean calibration error of the block's layers | held-out loss | perplexity | "
             "loss above dense |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['target'] or '-'} | {row['method']} | {row['calibration_error']:.5f} | {row['loss']:.5f} | "
                     f"{math.exp(row['loss']):.3f} | {row['loss'] - dense:+.5f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
