"""What 2:4 sparsity buys on the GPU: N:M checks, conversion to PyTorch's semi-structured sparse weights,
prefill and decode throughput, dense against sparse.

Unstructured sparsity buys no speed without a sparse kernel; 2:4 runs on sparse tensor cores (Ampere and
later) through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt where PyTorch was built with it, else
CUTLASS). Measurements use CUDA events after warm-up, median of repeats; results/semi_structured_*.md holds
what was measured.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from .calibration import find_blocks, target_linears
from .errors import UserError

HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def require_sparse_tensor_cores() -> torch.device:
    if not torch.cuda.is_available():
        raise UserError("measuring 2:4 speed needs a CUDA GPU with sparse tensor cores (compute capability 8.0 or "
                        "later); this machine has none")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        raise UserError(f"{torch.cuda.get_device_name()} has no sparse tensor cores (compute capability {major}.x; "
                        "2:4 kernels need 8.0 or later)")
    return torch.device("cuda")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every targeted linear of every decoder block, as the pruning pipeline targets them."""
    prefix, blocks = find_blocks(model)
    layers = {}
    for index, block in enumerate(blocks):
        layers |= target_linears(block, f"{prefix}.{index}")
    return layers


def nm_violation(weight: torch.Tensor, n: int, m: int) -> str | None:
    """Where `weight` holds more than n nonzeros in a group of m consecutive inputs (None if nowhere)."""
    rows, d = weight.shape
    if d % m:
        return f"its {d} inputs are not a multiple of {m}"
    counts = (weight.reshape(rows, d // m, m) != 0).sum(2)
    bad = (counts > n).nonzero()
    if len(bad) == 0:
        return None
    row, group = bad[0].tolist()
    return (f"row {row}, inputs {group * m}-{group * m + m - 1} hold {int(counts[row, group])} nonzeros "
            f"(at most {n} of every {m} allowed)")


def check_nm(layers: dict[str, nn.Linear], n: int = 2, m: int = 4) -> None:
    """A clear error naming the first layer whose weight is not N:M sparse."""
    for name, layer in layers.items():
        problem = nm_violation(layer.weight.detach(), n, m)
        if problem is not None:
            raise UserError(f"{name} is not {n}:{m} sparse: {problem}. Prune with --pattern {n}:{m} (and save with "
                            "--save) before asking for 2:4 kernels")


def to_semi_structured(layers: dict[str, nn.Linear]) -> None:
    """Replace each layer's weight by PyTorch's compressed 2:4 form (the layers must pass check_nm)."""
    from torch.sparse import to_sparse_semi_structured

    for name, layer in layers.items():
        try:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
        except (RuntimeError, ValueError) as error:
            raise UserError(f"{name} ({tuple(layer.weight.shape)}, {layer.weight.dtype}) cannot take 2:4 kernels: "
                            f"{error}") from error


def semi_structured_backend() -> str:
    from torch.sparse import SparseSemiStructuredTensor

    return "cutlass" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"


def cuda_seconds(run: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Seconds of each of `repeats` calls of `run`, by CUDA events, after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def kernel_seconds(run: Callable[[], object], repeats: int, warmup: int) -> float:
    """GPU kernel time of one call of `run` (torch.profiler, mean over `repeats` after `warmup`): what the
    call costs the GPU without the host-side work between kernels that `cuda_seconds` includes."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    total_us = sum(getattr(event, "self_device_time_total", 0) for event in profiler.key_averages())
    return total_us / 1e6 / repeats


def prefill_throughput(model, batch: int, tokens: int, repeats: int, warmup: int, vocab: int) -> dict:
    """Tokens per second of one forward over batch x tokens prompt tokens (no cache kept)."""
    ids = torch.randint(0, vocab, (batch, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        times = cuda_seconds(lambda: model(ids, use_cache=False, logits_to_keep=1), repeats, warmup)
    median = statistics.median(times)
    return {"batch": batch, "tokens": tokens, "median_s": median, "tokens_per_s": batch * tokens / median,
            "times_s": times}


def decode_throughput(model, batch: int, prompt: int, steps: int, repeats: int, warmup: int, vocab: int) -> dict:
    """Generated tokens per second: `steps` single-token forwards with a KV cache after a prompt of `prompt`
    tokens (the prefill is not timed)."""
    generator = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda", generator=generator)
    step_ids = torch.randint(0, vocab, (batch, 1), device="cuda", generator=generator)

    def one_run():
        cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            cache = model(step_ids, past_key_values=cache, use_cache=True).past_key_values
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000

    with torch.inference_mode():
        for _ in range(warmup):
            one_run()
        times = [one_run() for _ in range(repeats)]
    median = statistics.median(times)
    return {"batch": batch, "prompt": prompt, "steps": steps, "median_s": median,
            "tokens_per_s": batch * steps / median, "times_s": times}


def throughput(model, settings: dict, vocab: int) -> dict:
    return {"prefill": prefill_throughput(model, settings["batch"], settings["prefill"], settings["repeats"],
                                          settings["warmup"], vocab),
            "decode": decode_throughput(model, settings["batch"], settings["prompt"], settings["decode"],
                                        settings["repeats"], settings["warmup"], vocab)}


def speedups(dense: dict, sparse: dict) -> dict:
    return {phase: sparse[phase]["tokens_per_s"] / dense[phase]["tokens_per_s"] for phase in ("prefill", "decode")}
