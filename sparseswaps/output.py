"""What a pruning run writes: the result dictionary, the pruned model folder, the per-layer plot."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import write_json_atomic, write_masks, write_safetensors_atomic
from .data import provenance
from .models import LazyModel
from .provenance import environment, peak_memory

def results_report(config, model_info, store, calibration, perplexity, seconds, timings, bos, device) -> dict:
    """`timings` are this process's blocks (with checkpoint time); earlier processes' blocks of a resumed run
    report the stages their commit records hold."""
    layers = [row for record in store.records for row in record["layers"]]
    measured = {timing["block"]: timing for timing in timings}
    blocks = [measured.get(record["block"], {"block": record["block"], **record["timings"]}) for record in store.records]
    reductions = [row["reduction"] for row in layers if row["reduction"] is not None]
    refitted = [row["relative_reconstruction_error"] for row in layers if "relative_reconstruction_error" in row]
    return {
        "config": dataclasses.asdict(config),
        "model": model_info,
        "bos_per_window": bos,
        "data": provenance(("c4-train",) + tuple(config.eval)),
        "calibration": calibration,
        "perplexity": perplexity,
        "summary": {"layers": len(layers),
                    "mean_reduction": sum(reductions) / len(reductions) if reductions else None,
                    "mean_relative_reconstruction_error": sum(refitted) / len(refitted) if refitted else None,
                    "total_swaps": sum(row["swaps"] or 0 for row in layers),
                    "rows_converged": _rows_converged(layers),
                    "pruning_seconds": seconds, **peak_memory(device)},
        "blocks": blocks,
        "layers": layers,
        "environment": environment(),
    }


def _rows_converged(layers: list[dict]) -> dict | None:
    """Rows that reached a 1-swap local optimum before the scan cap, over all rows (swap solvers only)."""
    counted = [row for row in layers if row.get("rows_converged") is not None]
    if not counted:
        return None
    return {"converged": sum(row["rows_converged"] for row in counted), "rows": sum(row["shape"][0] for row in counted)}


def save_model(lazy: LazyModel, store, results: dict, save: Path) -> None:
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


def plots_available() -> bool:
    """matplotlib is the `plots` extra: without it the JSON is written and the plot is skipped, said once."""
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print("no plot written: matplotlib is not installed (pip install 'sparseswaps[plots]')", file=sys.stderr)
    return False


def plot_reductions(results: dict, path: Path) -> None:
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
