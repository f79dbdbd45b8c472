"""Full-model pruning: calibrate, prune block by block with any solver chain, evaluate, save, resume.

Memory is one block: the model is a meta-device skeleton (`models.LazyModel`) whose blocks are read from
their safetensors shards when processed; evaluation streams the blocks the same way; pruned blocks go to a
`checkpoint` store (a folder, or memory for runs that need no resumption), from which the pruned model is
evaluated and saved.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .calibration import (activation_device, capture_block_inputs, gram_groups, run_block, target_linears)
from .checkpoint import DiskStore, MemoryStore, write_json_atomic, write_masks, write_safetensors_atomic
from .data import EVAL_CORPORA, calibration_windows, provenance
from .errors import UserError
from .evaluate import streaming_perplexities
from .models import LazyModel, needs_bos_per_window, open_model
from .problem import MaskProblem, ProblemError, resolve_pattern
from .registry import get_solver, solve
from .zeroshot import check_tasks, zero_shot

# The quick protocol (the default) finishes in minutes on 2 CPU cores: small calibration, 32 evaluation
# windows, the warm start alone evaluated beside the result, and swaps taking up to 16 improving swaps per
# full scan, capped at 100 scans (rows converge well before on SmolLM2; the report counts those that do).
# The paper protocol is SparseGPT/Wanda's, with the paper's best-improvement swaps for up to 100 scans.
PROTOCOLS = {
    "quick": {"nsamples": 16, "seqlen": 512, "eval": ("wikitext2",), "eval_windows": 24,
              "swap_options": {"max_iters": 100, "swaps_per_scan": 16}, "warm_start_baseline": True},
    "paper": {"nsamples": 128, "seqlen": 2048, "eval": ("wikitext2", "c4"), "eval_windows": None,
              "swap_options": {"max_iters": 100}, "warm_start_baseline": False},
}


@dataclass
class PruneConfig:
    model: str | None = None
    tokenizer: str | None = None           # folder replacing a GGUF file's converted tokenizer
    solver: str = "swaps"
    warm_start: str | None = "auto"        # auto: Wanda for a solver that refines a warm start, else none
    sparsity: float | None = 0.5
    pattern: str | None = None
    protocol: str = "quick"
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    eval: tuple[str, ...] | None = None
    eval_windows: int | None = -1          # -1: the protocol's value; None: every window
    device: str = "auto"
    dtype: str = "auto"                    # storage dtype of the weights; auto: the checkpoint's
    update_weights: bool = False           # least-squares update of the kept weights after the mask is fixed
    solver_options: dict = field(default_factory=dict)
    bos_per_window: str = "auto"           # auto | yes | no
    zero_shot: tuple[str, ...] = ()        # lm-eval tasks evaluated on the pruned model
    zero_shot_limit: int | None = None     # items per task (plumbing checks only; reported runs use None)
    warm_start_baseline: bool | None = None   # also prune with the warm start alone and evaluate that model

    def resolved(self) -> "PruneConfig":
        """Fill protocol defaults and validate everything that can be checked before loading a model."""
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        preset = PROTOCOLS[self.protocol]
        warm_start = self.warm_start
        if warm_start == "auto":
            warm_start = "wanda" if get_solver(self.solver).warm_start else None
        config = dataclasses.replace(
            self, warm_start=warm_start, nsamples=self.nsamples or preset["nsamples"], seqlen=self.seqlen or preset["seqlen"],
            eval=tuple(preset["eval"] if self.eval is None else self.eval),
            eval_windows=preset["eval_windows"] if self.eval_windows == -1 else self.eval_windows,
            device=resolve_device(self.device), solver_options=self._solver_options(preset),
            warm_start_baseline=bool(warm_start) and (preset["warm_start_baseline"]
                                                           if self.warm_start_baseline is None
                                                           else self.warm_start_baseline))
        if config.pattern is not None:
            config = dataclasses.replace(config, sparsity=None)
        resolve_pattern(64 * 64, config.sparsity, config.pattern)   # range and syntax; widths checked per layer
        for name in [config.solver] + ([config.warm_start] if config.warm_start else []):
            get_solver(name)
        if config.warm_start and not get_solver(config.solver).warm_start:
            raise UserError(f"--solver {config.solver} ignores a warm start: drop --warm-start {config.warm_start} "
                            "(or give --warm-start none)")
        unknown = [c for c in config.eval if c not in EVAL_CORPORA]
        if unknown:
            raise UserError(f"unknown --eval corpus {', '.join(unknown)}; choose from {', '.join(EVAL_CORPORA)}")
        if config.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if config.bos_per_window not in ("auto", "yes", "no"):
            raise UserError("--bos-per-window must be auto, yes or no")
        check_tasks(config.zero_shot)
        return config

    def _solver_options(self, preset: dict) -> dict:
        """The protocol's swap options apply to the swaps solver where the user gave none of their own
        (several swaps per scan only for per-row sparsity: N:M swaps stay in their group)."""
        if self.solver != "swaps":
            return dict(self.solver_options)
        defaults = dict(preset["swap_options"])
        if self.pattern is not None:
            defaults.pop("swaps_per_scan", None)
        return {**defaults, **self.solver_options}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    `stop_after_block` stops after that block's commit (used to test resumption). `dense_cache` lets a
    caller running several configurations on one model evaluate the dense model once. Without
    `checkpointing` the pruned blocks are kept in memory instead of a checkpoint folder (small models only;
    not resumable).
    """
    config = config.resolved()
    checkpoint = checkpoint or _default_checkpoint(out, save)
    _check_outputs(out, save)
    lazy = open_model(config.model, DTYPES[config.dtype], config.tokenizer)
    bos = needs_bos_per_window(lazy.model) if config.bos_per_window == "auto" else config.bos_per_window == "yes"
    _check_prunable(lazy)
    _check_seqlen_fits(lazy.model, config.seqlen)
    store = DiskStore.open(checkpoint, config.fingerprint(), resume) if checkpointing else MemoryStore()
    device = torch.device(config.device)
    _reset_peaks(device)

    perplexity = {"dense": _dense_perplexities(lazy, config, device, bos, store, dense_cache)}
    samples = calibration_windows(lazy.tokenizer, config.nsamples, config.seqlen, config.seed, bos_per_window=bos)
    if config.warm_start_baseline:
        perplexity["warm_start"] = _warm_start_perplexities(lazy, config, device, bos, samples.input_ids, store)
    started = time.perf_counter()
    timings = _prune_blocks(lazy, store, config, device, samples.input_ids, "pruning blocks", stop_after_block)
    pruning_seconds = time.perf_counter() - started
    perplexity["pruned"] = streaming_perplexities(lazy, config.eval, config.seqlen, device, bos_per_window=bos,
                                                  max_windows=config.eval_windows, overrides=store.overrides,
                                                  desc="evaluating the pruned model")
    results = _results(config, lazy.info, store, samples.info, perplexity, pruning_seconds, timings, bos, device)
    if config.zero_shot:
        model = materialize_whole(lazy, _all_overrides(lazy, store), torch.device(device))
        results["zero_shot"] = zero_shot(model, lazy.tokenizer, config.zero_shot, device, limit=config.zero_shot_limit)
    if save is not None:
        _save_model(lazy, store, results, save)
    if out is not None:
        write_json_atomic(out, results)
        _plot_reductions(results, out.with_suffix(".png"))
    store.finish()
    return results


def _check_prunable(lazy: LazyModel) -> None:
    layers = sum(len(target_linears(block, f"{lazy.prefix}.{i}")) for i, block in enumerate(lazy.blocks))
    if layers == 0:
        raise UserError(f"the decoder blocks of {type(lazy.model).__name__} contain no nn.Linear layers to prune")


def _check_seqlen_fits(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} exceeds the model's {limit} positions: choose --seqlen {limit} or less")


def _dense_perplexities(lazy, config, device, bos, store, dense_cache) -> dict:
    """Measured once per (model, windows): from the checkpoint, the caller's cache, or a streaming pass."""
    if "dense" in store.saved:
        return store.saved["dense"]
    key = json.dumps([lazy.info.get("sha256", lazy.info.get("source")), config.eval, config.seqlen,
                      config.eval_windows, bos, str(lazy.dtype)])
    cache = dense_cache if dense_cache is not None else {}
    if key not in cache:
        cache[key] = streaming_perplexities(lazy, config.eval, config.seqlen, device, bos_per_window=bos,
                                            max_windows=config.eval_windows, desc="evaluating the dense model")
    store.save("dense", cache[key])
    return cache[key]


def _warm_start_perplexities(lazy, config, device, bos, input_ids, store) -> dict:
    """The model pruned with the warm start alone (same calibration, same windows), kept in memory and
    evaluated: what the final solver adds is the difference to this."""
    if "warm_start" in store.saved:
        return store.saved["warm_start"]
    alone = dataclasses.replace(config, solver=config.warm_start, warm_start=None, solver_options={},
                                update_weights=False)
    memory = MemoryStore()
    _prune_blocks(lazy, memory, alone, device, input_ids, f"pruning with {config.warm_start} alone")
    perplexity = streaming_perplexities(lazy, config.eval, config.seqlen, device, bos_per_window=bos,
                                        max_windows=config.eval_windows, overrides=memory.overrides,
                                        desc=f"evaluating {config.warm_start} alone")
    store.save("warm_start", perplexity)
    return perplexity


def _prune_blocks(lazy, store, config, device, input_ids, desc, stop_after_block=None) -> list[dict]:
    """Prune every block not yet committed to `store`; this process's per-block stage times."""
    hidden, kwargs = _calibration_inputs(lazy, input_ids, device)
    hidden = _replay_committed(lazy, store, hidden, kwargs, device)
    timings = []
    progress = tqdm(range(store.next_block, len(lazy.blocks)), desc=desc, unit="block")
    for index in progress:
        hidden, timing = _prune_block(index, lazy, store, hidden, kwargs[index], config, device)
        timings.append(timing)
        reductions = [row["reduction"] for record in store.records for row in record["layers"]
                      if row.get("reduction") is not None]
        if reductions:
            progress.set_postfix(mean_reduction=f"{sum(reductions) / len(reductions):.3f}")
        if stop_after_block is not None and index >= stop_after_block:
            store.wait()
            raise KeyboardInterrupt(f"stopped after block {index} as asked")
    return timings


def _calibration_inputs(lazy: LazyModel, input_ids: torch.Tensor, device) -> tuple[list, list]:
    """Block 0's inputs for every calibration window (on the GPU when they fit) and each block's kwargs."""
    hidden_size = lazy.model.config.get_text_config().hidden_size
    store = activation_device(device, input_ids.numel() * hidden_size * lazy.dtype.itemsize)
    lazy.load_outer(device)
    try:
        inputs = capture_block_inputs(lazy.model, lazy.blocks, input_ids, store)
    finally:
        lazy.release_outer()
    return inputs.hidden, inputs.kwargs


def _replay_committed(lazy, store, hidden, kwargs, device) -> list:
    """A resumed run recomputes the activations through the committed (pruned) blocks: identical to the
    ones the interrupted run had, and far cheaper to recompute than to store."""
    for index in tqdm(range(store.next_block), desc="replaying committed blocks", unit="block", leave=False):
        lazy.load_block(index, device, store.overrides(index))
        hidden = run_block(lazy.blocks[index], hidden, kwargs[index], device)
        lazy.release_block(index)
    return hidden


class _Stopwatch:
    """Seconds per stage, CUDA-synchronised so asynchronous kernels are charged to their own stage."""

    def __init__(self, device):
        self.device, self.laps, self._last = device, {}, time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[stage] = now - self._last
        self._last = now


def _prune_block(index, lazy, store, hidden, kwargs, config, device) -> tuple[list, dict]:
    watch = _Stopwatch(device)
    lazy.load_block(index, device)
    block = lazy.blocks[index]
    layers = target_linears(block, f"{lazy.prefix}.{index}")
    watch.lap("load_s")
    groups = gram_groups(block, layers, hidden, kwargs, device)
    watch.lap("gram_s")
    rows, masks = [], {}
    for group in groups:
        weights = [layers[name].weight.data for name in group.names]
        group_rows, group_masks, group_weights = prune_group(group.names, weights, group.statistics, config, device)
        for name, mask, weight in zip(group.names, group_masks, group_weights):
            layers[name].weight.data.copy_(weight.to(layers[name].weight.dtype))
            masks[name] = mask
        rows += [{"block": index, **row} for row in group_rows]
    rows.sort(key=lambda row: list(layers).index(row["layer"]))
    watch.lap("solve_s")
    if index < len(lazy.blocks) - 1:       # the last block's outputs feed no block
        hidden = run_block(block, hidden, kwargs, device)
    watch.lap("propagate_s")
    store.commit(index, {f"{name}.weight": layer.weight.data for name, layer in layers.items()}, masks,
                 {"block": index, "layers": rows, "timings": dict(watch.laps)})
    lazy.release_block(index)
    watch.lap("checkpoint_s")
    return hidden, {"block": index, **watch.laps}


def prune_group(names, weights, statistics, config, device) -> tuple[list[dict], list, list]:
    """Solve the layers reading one input as one problem with their rows stacked (rows are independent, so
    this is the same as solving each alone), then split the result per layer: a pure function of
    (W, G, pattern, solver settings). Returns the report rows, the masks and the new weights."""
    stacked = torch.cat([weight.to(device=device, dtype=torch.float32) for weight in weights])
    try:
        problem = MaskProblem(stacked, statistics.gram.to(device), config.sparsity, config.pattern,
                              input_mean=statistics.mean.to(device), num_tokens=statistics.tokens,
                              num_samples=statistics.samples, name="+".join(names), check_psd=False)
    except ProblemError as error:
        raise UserError(f"layer {names[0]}: {error}") from None
    chain = [config.warm_start, config.solver] if config.warm_start else [config.solver]
    result = solve(problem, chain, **config.solver_options)   # on the problem's device
    new_weight = result.weight if result.weight is not None else problem.weight * result.mask
    reconstruction = result.row_weight_objective
    if config.update_weights:
        refitted = solve(problem, "refit", warm_start=result.mask)
        new_weight, reconstruction = refitted.weight, refitted.row_weight_objective
        result.runtime_s += refitted.runtime_s
        chain = [*chain, "refit"]
    dense_energy = problem.objective(torch.zeros_like(result.mask))
    warm = result.extra.get("warm_start_row_objective")
    swaps, converged = result.extra.get("swaps"), result.extra.get("converged")
    rows, masks, new_weights, start = [], [], [], 0
    for name, weight in zip(names, weights):
        span = slice(start, start + weight.shape[0])
        start = span.stop
        objective = float(result.row_objective[span].sum())
        warm_objective = None if warm is None else float(warm[span].sum())
        row = {"layer": name, "shape": list(weight.shape), "pattern": str(problem.pattern),
               "solver": "+".join(chain), "objective": objective,
               "relative_error": objective / float(dense_energy[span].sum()),
               "warm_start_objective": warm_objective,
               "reduction": None if not warm_objective else 1 - objective / warm_objective,
               "swaps": None if swaps is None else int(swaps[span].sum()),
               "rows_converged": None if converged is None else int(converged[span].sum()),
               "termination": result.termination.value,
               "time_s": result.runtime_s * weight.shape[0] / problem.rows,
               "shares_input_with": [other for other in names if other != name]}
        if reconstruction is not None:
            row["reconstruction_error"] = float(reconstruction[span].sum())
        if "dtype" in result.extra:
            row["scan_dtype"] = result.extra["dtype"]
        rows.append(row)
        masks.append(result.mask[span])
        new_weights.append(new_weight[span])
    return rows, masks, new_weights


def _all_overrides(lazy: LazyModel, store) -> dict:
    overrides = {}
    for index in range(len(lazy.blocks)):
        overrides |= store.overrides(index)
    return overrides


def materialize_whole(lazy: LazyModel, overrides: dict, device) -> torch.nn.Module:
    """The whole model on `device`, for zero-shot evaluation (lm-eval needs it); a clear error when the
    blocks cannot fit on the GPU, since perplexity streams but zero-shot does not."""
    device = torch.device(device)
    size = sum(lazy.block_bytes(i) for i in range(len(lazy.blocks)))
    if device.type == "cuda" and size > torch.cuda.mem_get_info(device)[0]:
        raise UserError(f"zero-shot evaluation needs the whole model on the GPU ({size / 2**30:.1f} GiB of weights), "
                        f"more than is free on {device}: drop --zero-shot (perplexity streams block by block), or "
                        "evaluate the saved model on a larger GPU")
    return lazy.materialize(device, overrides)


def plots_available() -> bool:
    """matplotlib is the `plots` extra: without it the JSON is written and the plot is skipped, said once."""
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print("no plot written: matplotlib is not installed (pip install 'sparseswaps[plots]')", file=sys.stderr)
    return False


# ---- checkpoints -------------------------------------------------------------------------------------
def _default_checkpoint(out: Path | None, save: Path | None) -> Path:
    base = out if out is not None else (save if save is not None else Path("sparseswaps-run"))
    return base.with_name(base.name + ".checkpoint")


def _check_outputs(out, save) -> None:
    for path in (out, save):
        if path is not None and path.exists():
            raise UserError(f"{path} already exists: choose another path or remove it (nothing is overwritten)")


def _reset_peaks(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """Peak host RSS of this process and peak GPU memory allocated by torch, in GiB."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kilobytes on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_host_gib": host, "peak_gpu_gib": gpu}


# ---- outputs -----------------------------------------------------------------------------------------
def _results(config, model_info, store, calibration, perplexity, seconds, timings, bos, device) -> dict:
    """`timings` are this process's blocks (with checkpoint time); earlier processes' blocks of a resumed run
    report the stages their commit records hold."""
    layers = [row for record in store.records for row in record["layers"]]
    measured = {timing["block"]: timing for timing in timings}
    blocks = [measured.get(record["block"], {"block": record["block"], **record["timings"]}) for record in store.records]
    reductions = [row["reduction"] for row in layers if row["reduction"] is not None]
    return {
        "config": dataclasses.asdict(config),
        "model": model_info,
        "bos_per_window": bos,
        "data": provenance(("c4-train",) + tuple(config.eval)),
        "calibration": calibration,
        "perplexity": perplexity,
        "summary": {"layers": len(layers),
                    "mean_reduction": sum(reductions) / len(reductions) if reductions else None,
                    "total_swaps": sum(row["swaps"] or 0 for row in layers),
                    "rows_converged": _rows_converged(layers),
                    "pruning_seconds": seconds, **peak_memory(device)},
        "blocks": blocks,
        "layers": layers,
        "environment": environment(),
    }


def _rows_converged(layers: list[dict]) -> dict | None:
    """Rows that reached a 1-swap local optimum before the scan cap, over all rows (swaps solver only)."""
    counted = [row for row in layers if row.get("rows_converged") is not None]
    if not counted:
        return None
    return {"converged": sum(row["rows_converged"] for row in counted), "rows": sum(row["shape"][0] for row in counted)}


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


def _save_model(lazy: LazyModel, store, results: dict, save: Path) -> None:
    """A Hugging Face folder (config, tokenizer, one safetensors shard per block plus one for the rest, the
    shard index), `masks.safetensors` (bit-packed) and the report, written block by block beside `save` and
    renamed into place, so a crash never leaves a folder that looks complete."""
    partial = save.with_name(save.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lazy.model.config.save_pretrained(partial)
    if (lazy.folder / "generation_config.json").is_file():
        shutil.copy(lazy.folder / "generation_config.json", partial)
    lazy.tokenizer.save_pretrained(partial)
    count = len(lazy.blocks) + 1
    weight_map, total, masks = {}, 0, {}
    for shard, index in enumerate(tqdm(range(-1, len(lazy.blocks)), desc="saving", unit="shard", leave=False)):
        names = lazy.outer_names() if index < 0 else lazy.block_names(index)
        tensors = lazy.read(names) | (store.overrides(index) if index >= 0 else {})
        on_disk = {}
        for name in names:   # tied tensors are stored once, under their source's key
            on_disk.setdefault(lazy.sources[name][1], tensors[name])
        filename = f"model-{shard + 1:05d}-of-{count:05d}.safetensors"
        write_safetensors_atomic(partial / filename, on_disk, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(on_disk, filename)
        total += sum(t.numel() * t.element_size() for t in on_disk.values())
        if index >= 0:
            masks |= store.masks(index)
    write_json_atomic(partial / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_masks(partial / "masks.safetensors", masks)
    write_json_atomic(partial / "sparseswaps.json", results)
    partial.rename(save)


def _plot_reductions(results: dict, path: Path) -> None:
    if not plots_available():
        return
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
