"""Full-model pruning: calibrate, prune block by block with any solver chain, evaluate, save, resume.

The configuration is `config`, provenance `provenance`, what a run writes `output`; the checkpoint store is
`checkpoint`.

Memory is one block: the model is a meta-device skeleton (`models.LazyModel`) whose blocks are read from
their safetensors shards when processed; evaluation streams the blocks the same way; pruned blocks go to a
`checkpoint` store (a folder, or memory for runs that need no resumption), from which the pruned model is
evaluated and saved.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibration import (activation_device, capture_block_inputs, gram_groups, merge_chunks, run_block,
                          target_linears)
from .checkpoint import DiskStore, MemoryStore, write_json_atomic
from .config import DTYPES, PruneConfig
from .data import calibration_windows
from .distributed import SINGLE, Ranks, check_shards, shard_bounds, shared
from .errors import UserError
from .evaluate import streaming_perplexities
from .models import LazyModel, needs_bos_per_window, open_model
from .output import plot_reductions, results_report, save_model
from .problem import MaskProblem, ProblemError
from .provenance import reset_peaks
from .registry import solve
from .zeroshot import zero_shot


def prune_model(config: PruneConfig, out: Path | None = None, save: Path | None = None, *, resume: bool = False,
                checkpoint: Path | None = None, stop_after_block: int | None = None,
                dense_cache: dict | None = None, checkpointing: bool = True, ranks: Ranks = SINGLE) -> dict | None:
    """Run the whole pipeline and return the result dictionary (also written to `out` when given); under
    torchrun every rank calls it, rank 0 writes the outputs and returns the results, the others None.

    `stop_after_block` stops after that block's commit (used to test resumption). `dense_cache` lets a
    caller running several configurations on one model evaluate the dense model once. Without
    `checkpointing` the pruned blocks are kept in memory instead of a checkpoint folder (small models only;
    not resumable).
    """
    config = config.resolved()
    check_shards(config.shards, ranks, config.nsamples)
    checkpoint = checkpoint or _default_checkpoint(out, save)
    if ranks.main:
        _check_outputs(out, save)
    with ranks.node_leaders_first():     # a GGUF file is converted once per node, into the cache the others read
        lazy = open_model(config.model, DTYPES[config.dtype], config.tokenizer)
    bos = needs_bos_per_window(lazy.model) if config.bos_per_window == "auto" else config.bos_per_window == "yes"
    _check_prunable(lazy)
    _check_seqlen_fits(lazy.model, config.seqlen)
    local = None
    if ranks.main:
        local = DiskStore.open(checkpoint, config.fingerprint(), resume) if checkpointing else MemoryStore()
    store = shared(local, ranks)
    device = ranks.device(config.device)
    reset_peaks(device)

    perplexity = {"dense": _dense_perplexities(lazy, config, device, bos, store, dense_cache, ranks)}
    samples = calibration_windows(lazy.tokenizer, config.nsamples, config.seqlen, config.seed, bos_per_window=bos)
    own = _own_samples(samples.input_ids, config.shards, ranks)
    if config.warm_start_baseline:
        perplexity["warm_start"] = _warm_start_perplexities(lazy, config, device, bos, own, store, ranks)
    started = time.perf_counter()
    timings = _prune_blocks(lazy, store, config, device, own, "pruning blocks", stop_after_block, ranks)
    pruning_seconds = time.perf_counter() - started
    perplexity["pruned"] = streaming_perplexities(lazy, config.eval, config.seqlen, device, bos_per_window=bos,
                                                  max_windows=config.eval_windows, overrides=store.overrides,
                                                  desc="evaluating the pruned model", ranks=ranks)
    if not ranks.main:
        return None
    store = local
    results = results_report(config, lazy.info, store, samples.info, perplexity, pruning_seconds, timings, bos, device)
    results["ranks"] = ranks.world
    if config.zero_shot:
        model = materialize_whole(lazy, _all_overrides(lazy, store), torch.device(device))
        results["zero_shot"] = zero_shot(model, lazy.tokenizer, config.zero_shot, device, limit=config.zero_shot_limit)
    if save is not None:
        save_model(lazy, store, results, save)
    if out is not None:
        write_json_atomic(out, results)
        plot_reductions(results, out.with_suffix(".png"))
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


@dataclasses.dataclass
class OwnSamples:
    """This rank's calibration windows and its shards' boundaries inside them."""
    input_ids: torch.Tensor
    chunks: list[range]


def _own_samples(input_ids: torch.Tensor, shards: int, ranks: Ranks) -> OwnSamples:
    bounds = [shard_bounds(len(input_ids), shards)[shard] for shard in ranks.own_shards(shards)]
    first = bounds[0].start
    return OwnSamples(input_ids[first:bounds[-1].stop], [range(b.start - first, b.stop - first) for b in bounds])


def _dense_perplexities(lazy, config, device, bos, store, dense_cache, ranks) -> dict:
    """Measured once per (model, windows): from the checkpoint, the caller's cache, or a streaming pass."""
    if "dense" in store.saved:
        return store.saved["dense"]
    key = json.dumps([lazy.info.get("sha256", lazy.info.get("source")), config.eval, config.seqlen,
                      config.eval_windows, bos, str(lazy.dtype)])
    cache = dense_cache if dense_cache is not None else {}
    if key not in cache:
        cache[key] = streaming_perplexities(lazy, config.eval, config.seqlen, device, bos_per_window=bos,
                                            max_windows=config.eval_windows, desc="evaluating the dense model",
                                            ranks=ranks)
    store.save("dense", cache[key])
    return cache[key]


def _warm_start_perplexities(lazy, config, device, bos, own, store, ranks) -> dict:
    """The model pruned with the warm start alone (same calibration, same windows), kept in memory and
    evaluated: what the final solver adds is the difference to this."""
    if "warm_start" in store.saved:
        return store.saved["warm_start"]
    alone = dataclasses.replace(config, solver=config.warm_start, warm_start=None, solver_options={},
                                update_weights=False)
    memory = shared(MemoryStore() if ranks.main else None, ranks)
    _prune_blocks(lazy, memory, alone, device, own, f"pruning with {config.warm_start} alone", ranks=ranks)
    perplexity = streaming_perplexities(lazy, config.eval, config.seqlen, device, bos_per_window=bos,
                                        max_windows=config.eval_windows, overrides=memory.overrides,
                                        desc=f"evaluating {config.warm_start} alone", ranks=ranks)
    store.save("warm_start", perplexity)
    return perplexity


def _prune_blocks(lazy, store, config, device, own: OwnSamples, desc, stop_after_block=None,
                  ranks: Ranks = SINGLE) -> list[dict]:
    """Prune every block not yet committed to `store`; this process's per-block stage times."""
    hidden, kwargs = _calibration_inputs(lazy, own.input_ids, device)
    hidden = _replay_committed(lazy, store, hidden, kwargs, device)
    timings = []
    progress = tqdm(range(store.next_block, len(lazy.blocks)), desc=desc, unit="block")
    for index in progress:
        hidden, timing = _prune_block(index, lazy, store, hidden, kwargs[index], config, device, own.chunks, ranks)
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
    """Block 0's inputs for every calibration window (on the GPU when they fit) and each block's kwargs.

    The embeddings and the rotary tables are computed on the CPU whatever `device` is: a GPU's cos and sin
    round differently in the last bit, and the committed tables were calibrated with CPU tables
    (benchmarks/README.md §8 says how this was found). This pass is only the embeddings."""
    hidden_size = lazy.model.config.get_text_config().hidden_size
    store = activation_device(device, input_ids.numel() * hidden_size * lazy.dtype.itemsize)
    lazy.load_outer("cpu")
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


def _prune_block(index, lazy, store, hidden, kwargs, config, device, chunks, ranks) -> tuple[list, dict]:
    watch = _Stopwatch(device)
    lazy.load_block(index, device)
    block = lazy.blocks[index]
    layers = target_linears(block, f"{lazy.prefix}.{index}")
    watch.lap("load_s")
    groups = merge_chunks([gram_groups(block, layers, hidden[c.start:c.stop], kwargs, device) for c in chunks],
                          ranks)
    watch.lap("gram_s")
    rows, masks = [], {}
    for group in groups:
        weights = [layers[name].weight.data for name in group.names]
        group_rows, group_masks, group_weights = prune_group(group.names, weights, group.statistics, config, device,
                                                             ranks)
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


def prune_group(names, weights, statistics, config, device, ranks: Ranks = SINGLE) -> tuple[list[dict], list, list]:
    """Solve the layers reading one input as one problem with their rows stacked (rows are independent, so
    this is the same as solving each alone), then split the result per layer: a pure function of
    (W, G, pattern, solver settings, shards). The rows are cut into `config.shards` slices solved one by one
    (each rank its own, gathered after), so the result does not depend on the rank count. Returns the
    report rows, the masks and the new weights."""
    stacked = torch.cat([weight.to(device=device, dtype=torch.float32) for weight in weights])
    try:
        problem = MaskProblem(stacked, statistics.gram.to(device), config.sparsity, config.pattern,
                              input_mean=statistics.mean.to(device), num_tokens=statistics.tokens,
                              num_samples=statistics.samples, name="+".join(names), check_psd=False)
    except ProblemError as error:
        raise UserError(f"layer {names[0]}: {error}") from None
    slices = shard_bounds(problem.rows, config.shards)
    if not slices[-1]:
        raise UserError(f"layer {names[0]} has {problem.rows} rows, fewer than --shards {config.shards}")
    parts = [_solve_rows(problem.subset(slice(s.start, s.stop)), config) for s in
             (slices[shard] for shard in ranks.own_shards(config.shards))]
    rows, meta = _gathered(parts, slices, ranks)
    dense_energy = problem.objective(torch.zeros_like(rows["mask"]))
    report, masks, new_weights, start = [], [], [], 0
    for name, weight in zip(names, weights):
        span = slice(start, start + weight.shape[0])
        start = span.stop
        report.append(_report_row(name, weight, names, problem, rows, meta, span, dense_energy))
        masks.append(rows["mask"][span])
        new_weights.append(rows["weight"][span])
    return report, masks, new_weights


def _solve_rows(problem: MaskProblem, config) -> tuple[dict, dict]:
    """One slice of rows through the chain (and the re-fit): per-row tensors, and what describes the solve."""
    chain = [config.warm_start, config.solver] if config.warm_start else [config.solver]
    result = solve(problem, chain, **config.solver_options)   # on the problem's device
    rows = {"mask": result.mask,
            "weight": result.weight if result.weight is not None else problem.weight * result.mask,
            "objective": result.row_objective, "reconstruction": result.row_weight_objective,
            "warm": result.extra.get("warm_start_row_objective"), "swaps": result.extra.get("swaps"),
            "converged": result.extra.get("converged")}
    runtime = result.runtime_s
    if config.update_weights:
        refitted = solve(problem, "refit", warm_start=result.mask)
        rows["weight"], rows["reconstruction"] = refitted.weight, refitted.row_weight_objective
        runtime += refitted.runtime_s
        chain = [*chain, "refit"]
    meta = {"chain": chain, "termination": result.termination.value, "runtime_s": runtime,
            "scan_dtype": result.extra.get("dtype"), "solver_weights": result.weight is not None}
    return {key: value for key, value in rows.items() if value is not None}, meta


def _gathered(parts: list[tuple[dict, dict]], slices: list[range], ranks: Ranks) -> tuple[dict, dict]:
    """Every slice's rows in order, on every rank, and the solves' description (terminations in order of
    first appearance, runtimes summed)."""
    metas = [meta for part in ranks.gather_objects([meta for _, meta in parts]) for meta in part]
    keys = sorted(parts[0][0])
    counts = [sum(len(slices[s]) for s in ranks.own_shards(len(slices), rank)) for rank in range(ranks.world)]
    rows = {key: ranks.gather_rows(torch.cat([part[key].to(parts[0][0][key].device) for part, _ in parts]), counts)
            for key in keys}
    meta = {"chain": metas[0]["chain"], "runtime_s": sum(m["runtime_s"] for m in metas),
            "termination": ",".join(dict.fromkeys(m["termination"] for m in metas)),
            "scan_dtype": metas[0]["scan_dtype"], "solver_weights": metas[0]["solver_weights"]}
    return rows, meta


def _report_row(name, weight, names, problem, rows, meta, span, dense_energy) -> dict:
    objective = float(rows["objective"][span].sum())
    warm_objective = float(rows["warm"][span].sum()) if "warm" in rows else None
    energy = float(dense_energy[span].sum())
    # A solver that re-fits the weights trades the mask-only error for the re-fitted one: no mask reduction.
    mask_reduction = warm_objective and not meta["solver_weights"]
    row = {"layer": name, "shape": list(weight.shape), "pattern": str(problem.pattern),
           "solver": "+".join(meta["chain"]), "objective": objective,
           "relative_error": objective / energy,
           "warm_start_objective": warm_objective,
           "reduction": 1 - objective / warm_objective if mask_reduction else None,
           "swaps": int(rows["swaps"][span].sum()) if "swaps" in rows else None,
           "rows_converged": int(rows["converged"][span].sum()) if "converged" in rows else None,
           "termination": meta["termination"],
           "time_s": meta["runtime_s"] * weight.shape[0] / problem.rows,
           "shares_input_with": [other for other in names if other != name]}
    if "reconstruction" in rows:
        row["reconstruction_error"] = float(rows["reconstruction"][span].sum())
        row["relative_reconstruction_error"] = row["reconstruction_error"] / energy
    if meta["scan_dtype"] is not None:
        row["scan_dtype"] = meta["scan_dtype"]
    return row


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


def _default_checkpoint(out: Path | None, save: Path | None) -> Path:
    base = out if out is not None else (save if save is not None else Path("sparseswaps-run"))
    return base.with_name(base.name + ".checkpoint")


def _check_outputs(out, save) -> None:
    for path in (out, save):
        if path is not None and path.exists():
            raise UserError(f"{path} already exists: choose another path or remove it (nothing is overwritten)")


