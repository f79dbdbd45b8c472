"""What 2:4 buys on the GPU: per-layer matmul speedups at Llama-3-8B and -70B shapes, and end to end on an
8B-shaped model (random weights, magnitude 2:4 masks: right for time, meaningless for quality).

Per layer: y = x Wᵀ in bf16 for several token counts, dense (W with its zeros) against
`to_sparse_semi_structured(W)` with each backend PyTorch offers here (cuSPARSELt, CUTLASS); CUDA events,
median of repeats after warm-up; the sparse output checked against the dense one. End to end: prefill and
decode throughput of the whole model through `sparseswaps.speed`, dense with zeros against every block
linear converted, and the logits of both compared.

    python benchmarks/bench_semi_structured.py --out benchmarks/results/semi_structured_h200.json   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sparseswaps import NM, mask_from_scores  # noqa: E402
from sparseswaps.errors import UserError  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402
from sparseswaps.speed import (block_linears, check_nm, cuda_seconds, kernel_seconds,  # noqa: E402
                               require_sparse_tensor_cores, speedups, throughput, to_semi_structured)

LAYERS = {"llama3-8b": {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
                        "down_proj": (4096, 14336)},
          "llama3-70b": {"q/o_proj": (8192, 8192), "k/v_proj": (1024, 8192), "gate/up_proj": (28672, 8192),
                         "down_proj": (8192, 28672)}}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


def two_four(weight: torch.Tensor) -> torch.Tensor:
    return weight * mask_from_scores(weight.abs().float(), NM(2, 4))


def backends() -> list[str]:
    from torch.sparse import SparseSemiStructuredTensor

    found = []
    for name, force in (("cusparselt", False), ("cutlass", True)):
        SparseSemiStructuredTensor._FORCE_CUTLASS = force
        try:
            probe = two_four(torch.randn(128, 128, device="cuda", dtype=torch.bfloat16))
            F.linear(torch.randn(64, 128, device="cuda", dtype=torch.bfloat16),
                     torch.sparse.to_sparse_semi_structured(probe))
            found.append(name)
        except (RuntimeError, ValueError) as error:
            print(f"backend {name} unavailable: {error}", flush=True)
            UNAVAILABLE[name] = str(error)
    return found


UNAVAILABLE: dict[str, str] = {}


def layer_rows(repeats: int, warmup: int) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor

    generator = torch.Generator("cuda").manual_seed(0)
    rows = []
    for backend in backends():
        SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
        for shape, layers in LAYERS.items():
            for layer, (out_features, in_features) in layers.items():
                weight = two_four(torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16,
                                              generator=generator))
                sparse = torch.sparse.to_sparse_semi_structured(weight)
                for tokens in TOKENS:
                    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
                    dense_s = statistics.median(cuda_seconds(lambda: F.linear(x, weight), repeats, warmup))
                    sparse_s = statistics.median(cuda_seconds(lambda: F.linear(x, sparse), repeats, warmup))
                    dense_kernel_s = kernel_seconds(lambda: F.linear(x, weight), repeats, warmup)
                    sparse_kernel_s = kernel_seconds(lambda: F.linear(x, sparse), repeats, warmup)
                    reference = F.linear(x, weight).float()
                    error = ((F.linear(x, sparse).float() - reference).norm() / reference.norm()).item()
                    rows.append({"backend": backend, "model_shape": shape, "layer": layer,
                                 "out_features": out_features, "in_features": in_features, "tokens": tokens,
                                 "dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s,
                                 "dense_kernel_s": dense_kernel_s, "sparse_kernel_s": sparse_kernel_s,
                                 "kernel_speedup": dense_kernel_s / sparse_kernel_s,
                                 "relative_output_difference": error})
                    print(json.dumps(rows[-1]), flush=True)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return rows


def random_8b_model():
    from bench_pipeline import llama_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama_config("llama3-8b", 32), dtype=torch.bfloat16)
    return model.eval()


def end_to_end(settings: dict) -> dict:
    model = random_8b_model()
    layers = block_linears(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(two_four(layer.weight))
    check_nm(layers)
    probe = torch.randint(0, model.config.vocab_size, (2, 256), device="cuda",
                          generator=torch.Generator("cuda").manual_seed(1))
    with torch.inference_mode():
        dense_logits = model(probe).logits.float()
    dense = throughput(model, settings, model.config.vocab_size)
    to_semi_structured(layers)
    with torch.inference_mode():
        sparse_logits = model(probe).logits.float()
    sparse = throughput(model, settings, model.config.vocab_size)
    difference = ((sparse_logits - dense_logits).norm() / dense_logits.norm()).item()
    result = {"model_shape": "llama3-8b", "blocks": 32, "layers_converted": len(layers), "settings": settings,
              "dense": dense, "2:4": sparse, "speedup": speedups(dense, sparse),
              "relative_logit_difference": difference}
    print(json.dumps({k: v for k, v in result.items() if k not in ("dense", "2:4")}), flush=True)
    return result


def markdown(report: dict) -> str:
    lines = []
    for key, title in (("kernel_speedup", "GPU kernel time (torch.profiler)"),
                       ("speedup", "time per call (CUDA events: kernels plus the host work between them)")):
        lines += [f"Speedup of 2:4 over dense bf16, {title}:", "",
                  "| backend | shape | layer (out x in) | " + " | ".join(f"{t} tok" for t in TOKENS) + " |",
                  "|---|---|---|" + "---:|" * len(TOKENS)]
        keyed = {}
        for row in report["layers"]:
            keyed.setdefault((row["backend"], row["model_shape"], row["layer"], row["out_features"],
                              row["in_features"]), {})[row["tokens"]] = row[key]
        for (backend, shape, layer, out_features, in_features), by_tokens in keyed.items():
            lines.append(f"| {backend} | {shape} | {layer} ({out_features}x{in_features}) | "
                         + " | ".join(f"{by_tokens[t]:.2f}x" for t in TOKENS) + " |")
        lines.append("")
    lines += [f"Backend {name} unavailable here: {reason}" for name, reason in report.get("unavailable", {}).items()]
    for run in report.get("end_to_end", []):
        s = run["settings"]
        lines.append(f"\nEnd to end, {run['model_shape']}-shaped model ({run['layers_converted']} linears converted, "
                     f"random weights): prefill {s['batch']} x {s['prefill']} tokens "
                     f"{run['dense']['prefill']['tokens_per_s']:,.0f} -> {run['2:4']['prefill']['tokens_per_s']:,.0f} "
                     f"tok/s ({run['speedup']['prefill']:.2f}x); decode batch {s['batch']} after {s['prompt']} tokens, "
                     f"{s['decode']} steps: {run['dense']['decode']['tokens_per_s']:,.0f} -> "
                     f"{run['2:4']['decode']['tokens_per_s']:,.0f} tok/s ({run['speedup']['decode']:.2f}x); "
                     f"relative logit difference {run['relative_logit_difference']:.1e}.")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(LAYERS), figsize=(12, 4.2), sharey=True)
    for axis, shape in zip(axes, LAYERS):
        for backend in sorted({row["backend"] for row in report["layers"]}):
            for layer in LAYERS[shape]:
                rows = [r for r in report["layers"] if (r["model_shape"], r["layer"], r["backend"]) ==
                        (shape, layer, backend)]
                line, = axis.plot([r["tokens"] for r in rows], [r["kernel_speedup"] for r in rows], marker="o",
                                  label=f"{layer} ({backend}) kernels")
                axis.plot([r["tokens"] for r in rows], [r["speedup"] for r in rows], marker=".", linestyle="--",
                          color=line.get_color(), label=f"{layer} ({backend}) per call")
        axis.axhline(1, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_title(f"{shape} layer shapes")
        axis.set_xlabel("tokens in the matmul")
    axes[0].set_ylabel("2:4 speedup over dense (bf16)")
    axes[-1].legend(fontsize=7)
    figure.suptitle(f"2:4 semi-structured matmul on {torch.cuda.get_device_name()}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()
    try:
        require_sparse_tensor_cores()
    except UserError as error:
        raise SystemExit(str(error)) from error
    report = {"device": torch.cuda.get_device_name(), "layers": layer_rows(args.repeats, args.warmup),
              "unavailable": UNAVAILABLE, "environment": environment()}
    args.out.write_text(json.dumps(report, indent=1))
    if not args.no_end_to_end:
        settings = {"batch": 4, "prefill": 2048, "prompt": 512, "decode": 64, "repeats": 5, "warmup": 2}
        report["end_to_end"] = [end_to_end(settings)]
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
