"""Full-model pruning: calibrate, prune block by block with any solver chain, evaluate, save, resume."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .calibration import (capture_block_inputs, find_blocks, gram_matrices, run_block, stage_activations,
                          target_linears)
from .data import EVAL_CORPORA, calibration_windows, provenance
from .errors import UserError
from .evaluate import evaluate_perplexities
from .models import load_model, needs_bos_per_window, write_model_folder
from .problem import MaskProblem, ProblemError, pruned_first, resolve_pattern
from .registry import get_solver, solve
from .zeroshot import check_tasks, zero_shot

# The quick protocol (the default) finishes in minutes on 2 CPU cores: small calibration, 32 evaluation
# windows, and at most 5 swap iterations per row (on this kind of CPU one iteration over all of
# SmolLM2's rows costs ~40 s). The paper protocol is SparseGPT/Wanda's, with 100 swap iterations.
PROTOCOLS = {
    "quick": {"nsamples": 16, "seqlen": 512, "eval": ("wikitext2",), "eval_windows": 32, "swap_iters": 5},
    "paper": {"nsamples": 128, "seqlen": 2048, "eval": ("wikitext2", "c4"), "eval_windows": None, "swap_iters": 100},
}


@dataclass
class PruneConfig:
    model: str | None = None
    tokenizer: str | None = None           # folder replacing a GGUF file's converted tokenizer
    solver: str = "swaps"
    warm_start: str | None = "wanda"
    sparsity: float | None = 0.5
    pattern: str | None = None
    protocol: str = "quick"
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    eval: tuple[str, ...] | None = None
    eval_windows: int | None = -1          # -1: the protocol's value; None: every window
    device: str = "auto"
    dtype: str = "float32"
    update_weights: bool = False           # least-squares update of the kept weights after the mask is fixed
    solver_options: dict = field(default_factory=dict)
    bos_per_window: str = "auto"           # auto | yes | no
    zero_shot: tuple[str, ...] = ()        # lm-eval tasks evaluated on the pruned model
    zero_shot_limit: int | None = None     # items per task (plumbing checks only; reported runs use None)

    def resolved(self) -> "PruneConfig":
        """Fill protocol defaults and validate everything that can be checked before loading a model."""
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        preset = PROTOCOLS[self.protocol]
        config = dataclasses.replace(
            self, nsamples=self.nsamples or preset["nsamples"], seqlen=self.seqlen or preset["seqlen"],
            eval=tuple(preset["eval"] if self.eval is None else self.eval),
            eval_windows=preset["eval_windows"] if self.eval_windows == -1 else self.eval_windows,
            device=resolve_device(self.device), solver_options=self._solver_options(preset))
        if config.pattern is not None:
            config = dataclasses.replace(config, sparsity=None)
        resolve_pattern(64 * 64, config.sparsity, config.pattern)   # range and syntax; widths checked per layer
        for name in [config.solver] + ([config.warm_start] if config.warm_start else []):
            get_solver(name)
        unknown = [c for c in config.eval if c not in EVAL_CORPORA]
        if unknown:
            raise UserError(f"unknown --eval corpus {', '.join(unknown)}; choose from {', '.join(EVAL_CORPORA)}")
        if config.dtype not in _DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}")
        if config.bos_per_window not in ("auto", "yes", "no"):
            raise UserError("--bos-per-window must be auto, yes or no")
        check_tasks(config.zero_shot)
        return config

    def _solver_options(self, preset: dict) -> dict:
        """The protocol's swap-iteration cap applies to the swaps solver unless max_iters is given."""
        if self.solver == "swaps" and "max_iters" not in self.solver_options:
            return {**self.solver_options, "max_iters": preset["swap_iters"]}
        return dict(self.solver_options)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but CUDA is not available here")
    return device


def prune_model(config: PruneConfig, out: Path | None = None, save: Path | None = None, *, resume: bool = False,
                checkpoint: Path | None = None, stop_after_block: int | None = None,
                dense_cache: dict | None = None, checkpointing: bool = True) -> dict:
    """Run the whole pipeline and return the result dictionary (also written to `out` when given).

    `stop_after_block` stops after that block's checkpoint (used to test resumption). `dense_cache` lets a
    caller running several configurations on one model evaluate the dense model once. Without
    `checkpointing` nothing is written per block (faster; not resumable).
    """
    config = config.resolved()
    checkpoint = checkpoint or _default_checkpoint(out, save)
    _check_outputs(out, save, checkpoint if checkpointing else None, resume)
    model, tokenizer, model_info = load_model(config.model, _DTYPES[config.dtype], config.tokenizer)
    bos = needs_bos_per_window(model) if config.bos_per_window == "auto" else config.bos_per_window == "yes"
    prefix, blocks = find_blocks(model)
    layer_count = sum(len(target_linears(block, f"{prefix}.{i}")) for i, block in enumerate(blocks))
    if layer_count == 0:
        raise UserError(f"the decoder blocks of {type(model).__name__} contain no nn.Linear layers to prune")
    state = _load_checkpoint(checkpoint, config, model, blocks) if resume else None
    device = torch.device(config.device)
    started = time.perf_counter()

    _check_seqlen_fits(model, config.seqlen)
    if state is None:
        samples = calibration_windows(tokenizer, config.nsamples, config.seqlen, config.seed, bos_per_window=bos)
        dense_key = json.dumps([model_info.get("sha256", model_info.get("source")), config.eval, config.seqlen,
                                config.eval_windows, bos, config.dtype])
        cache = dense_cache if dense_cache is not None else {}
        if dense_key not in cache:
            cache[dense_key] = _evaluate(model, tokenizer, config, device, bos)
        dense = cache[dense_key]
        inputs = capture_block_inputs(model, blocks, samples.input_ids)
        state = {"next_block": 0, "layers": [], "dense": dense, "calibration": samples.info,
                 "hidden": inputs.hidden, "kwargs": inputs.kwargs, "masks": {}}
    model.cpu()
    state["hidden"] = stage_activations(state["hidden"], device)
    progress = tqdm(range(state["next_block"], len(blocks)), desc="pruning blocks", unit="block")
    for index in progress:
        _prune_block(index, blocks[index], f"{prefix}.{index}", state, config, device)
        state["next_block"] = index + 1
        if checkpointing:
            _write_checkpoint(checkpoint, config, state, blocks)
        reductions = [row["reduction"] for row in state["layers"] if row.get("reduction") is not None]
        if reductions:
            progress.set_postfix(mean_reduction=f"{sum(reductions) / len(reductions):.3f}")
        if stop_after_block is not None and index >= stop_after_block:
            raise KeyboardInterrupt(f"stopped after block {index} as asked")
    pruning_seconds = time.perf_counter() - started
    del state["hidden"]   # free the activations (possibly on the GPU) before evaluating
    pruned = _evaluate(model, tokenizer, config, device, bos)
    results = _results(config, model_info, state, pruned, pruning_seconds, bos)
    if config.zero_shot:
        results["zero_shot"] = zero_shot(model, tokenizer, config.zero_shot, device, limit=config.zero_shot_limit)
        model.cpu()
    if save is not None:
        _save_model(model, tokenizer, state["masks"], results, save)
    if out is not None:
        write_json_atomic(out, results)
        _plot_reductions(results, out.with_suffix(".png"))
    if checkpointing:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return results


def _check_seqlen_fits(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {limit} positions: choose --seqlen {limit} or less")


def _evaluate(model, tokenizer, config, device, bos) -> dict:
    if not config.eval:
        return {}
    model.to(device)
    try:
        return evaluate_perplexities(model, tokenizer, config.eval, config.seqlen, device, bos_per_window=bos,
                                     max_windows=config.eval_windows)
    finally:
        model.cpu()


def _prune_block(index, block, name_prefix, state, config, device) -> None:
    block.to(device)
    layers = target_linears(block, name_prefix)
    kwargs = state["kwargs"][index]
    statistics = gram_matrices(block, layers, state["hidden"], kwargs, device)
    for name, layer in layers.items():
        row, mask, weight = prune_layer(name, layer.weight.data, statistics[name], config, device)
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
        state["masks"][name] = mask.cpu()
        state["layers"].append({"block": index, **row})
    state["hidden"] = run_block(block, state["hidden"], kwargs, device)
    block.cpu()


def prune_layer(name, weight, statistics, config, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Solve one layer's problem: a pure function of (W, G, pattern, solver settings).

    Returns the report row, the mask and the new weight (masked, or updated by SparseGPT / least squares).
    """
    try:
        problem = MaskProblem(weight.to(device=device, dtype=torch.float32), statistics.gram.to(device),
                              config.sparsity, config.pattern, input_mean=statistics.mean.to(device),
                              num_tokens=statistics.tokens, num_samples=statistics.samples, name=name,
                              check_psd=False)
    except ProblemError as error:
        raise UserError(f"layer {name}: {error}") from None
    chain = [config.warm_start, config.solver] if config.warm_start else [config.solver]
    result = solve(problem, chain, **config.solver_options)   # on the problem's device
    mask = result.mask
    new_weight = result.extra.get("weight", problem.weight * mask)
    dense_energy = float(problem.objective(torch.zeros_like(mask)).sum())
    warm = result.extra.get("warm_start_objective")
    row = {"layer": name, "shape": list(problem.weight.shape), "pattern": str(problem.pattern),
           "solver": "+".join(chain), "objective": result.objective, "relative_error": result.objective / dense_energy,
           "warm_start_objective": warm, "reduction": None if not warm else 1 - result.objective / warm,
           "swaps": result.extra.get("swaps_total"), "termination": result.termination.value,
           "time_s": result.runtime_s}
    if "reconstruction_error" in result.extra:
        row["reconstruction_error"] = result.extra["reconstruction_error"]
    if config.update_weights:
        new_weight = least_squares_update(problem, mask)
        row["reconstruction_error"] = float(problem.reconstruction_error(new_weight).sum())
    return row, mask, new_weight


def least_squares_update(problem: MaskProblem, mask: torch.Tensor, damping: float = 1e-6,
                         batch_rows: int = 64) -> torch.Tensor:
    """Kept weights of each row re-fitted by least squares: w'_K = G_KK⁻¹ (G w)_K, w'_¬K = 0."""
    gram = problem.gram.to(torch.float64)
    gram = gram + damping * gram.diagonal().mean() * torch.eye(problem.d, dtype=gram.dtype, device=gram.device)
    weight = problem.weight.to(torch.float64)
    target = weight @ gram
    updated = torch.zeros_like(weight)
    kept = problem.keep
    for start in range(0, problem.rows, batch_rows):
        rows = slice(start, start + batch_rows)
        index = pruned_first(~mask[rows])[:, :kept]   # the kept entries, ascending
        system = gram[index.unsqueeze(2), index.unsqueeze(1)]
        rhs = torch.gather(target[rows], 1, index).unsqueeze(2)
        updated[rows].scatter_(1, index, torch.linalg.solve(system, rhs).squeeze(2))
    return updated.to(problem.weight.dtype)


# ---- checkpoints -------------------------------------------------------------------------------------
def _default_checkpoint(out: Path | None, save: Path | None) -> Path:
    base = out if out is not None else (save if save is not None else Path("sparseswaps-run"))
    return base.with_name(base.name + ".checkpoint")


def _check_outputs(out, save, checkpoint, resume) -> None:
    for path in (out, save):
        if path is not None and path.exists():
            raise UserError(f"{path} already exists: choose another path or remove it (nothing is overwritten)")
    if checkpoint is None:
        return
    if resume and not (checkpoint / "state.json").is_file():
        raise UserError(f"--resume: no checkpoint at {checkpoint} to resume from")
    if not resume and checkpoint.exists():
        raise UserError(f"an interrupted run left a checkpoint at {checkpoint}: pass --resume to continue it, "
                        "or remove it to start over")


def _write_checkpoint(path: Path, config: PruneConfig, state: dict, blocks: nn.ModuleList) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    index = state["next_block"] - 1
    block_state = {k: v.detach().cpu().contiguous() for k, v in blocks[index].state_dict().items()}
    save_file(block_state, str(path / f"block_{index}.safetensors"))
    torch.save({"hidden": [states.cpu() for states in state["hidden"]], "kwargs": state["kwargs"],
                "masks": state["masks"]},
               path / "tensors.pt.tmp")
    os.replace(path / "tensors.pt.tmp", path / "tensors.pt")
    meta = {k: v for k, v in state.items() if k not in ("hidden", "kwargs", "masks")}
    write_json_atomic(path / "state.json", {"fingerprint": config.fingerprint(), **meta})


def _load_checkpoint(path: Path, config: PruneConfig, model, blocks) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    if meta.pop("fingerprint") != config.fingerprint():
        raise UserError(f"the checkpoint at {path} was made with a different configuration: resume with the "
                        "same arguments, or remove it to start over")
    for index in range(meta["next_block"]):
        blocks[index].load_state_dict(load_file(str(path / f"block_{index}.safetensors")))
    tensors = torch.load(path / "tensors.pt", weights_only=False)
    return {**meta, **tensors}


# ---- outputs -----------------------------------------------------------------------------------------
def _results(config, model_info, state, pruned, seconds, bos) -> dict:
    layers = state["layers"]
    reductions = [row["reduction"] for row in layers if row["reduction"] is not None]
    return {
        "config": dataclasses.asdict(config),
        "model": model_info,
        "bos_per_window": bos,
        "data": provenance(("c4-train",) + tuple(config.eval)),
        "calibration": state["calibration"],
        "perplexity": {"dense": state["dense"], "pruned": pruned},
        "summary": {"layers": len(layers),
                    "mean_reduction": sum(reductions) / len(reductions) if reductions else None,
                    "total_swaps": sum(row["swaps"] or 0 for row in layers),
                    "pruning_seconds": seconds},
        "layers": layers,
        "environment": environment(),
    }


def environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "datasets", "safetensors", "pyscipopt", "highspy", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    # A copied tree can sit on a stale .git: then the commit alone does not identify the code.
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {"sparseswaps": __version__, "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": None if changes is None else bool(changes), "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(temporary, path)


def _save_model(model, tokenizer, masks: dict, results: dict, save: Path) -> None:
    from safetensors.torch import save_file

    def write_masks_and_report(folder: Path) -> None:
        save_file({name: mask.contiguous() for name, mask in masks.items()}, str(folder / "masks.safetensors"))
        write_json_atomic(folder / "sparseswaps.json", results)

    write_model_folder(model, tokenizer, save, write_masks_and_report)


def _plot_reductions(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [row for row in results["layers"] if row["reduction"] is not None]
    if not layers:
        return
    kinds = sorted({row["layer"].rsplit(".", 1)[-1] for row in layers})
    figure, axis = plt.subplots(figsize=(max(6, len(layers) * 0.06), 3.5))
    for kind in kinds:
        points = [(i, 100 * row["reduction"]) for i, row in enumerate(layers) if row["layer"].endswith(kind)]
        axis.scatter([p[0] for p in points], [p[1] for p in points], s=10, label=kind)
    axis.set_xlabel("layer (in pruning order)")
    axis.set_ylabel("error reduction vs warm start (%)")
    axis.set_title(f"{results['config']['solver']} over {results['config']['warm_start']}: per-layer error reduction")
    axis.legend(fontsize=7, ncol=len(kinds))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
