"""What a pruning run is asked to do: the protocols and `PruneConfig`, validated before any model loads."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import torch

from .data import EVAL_CORPORA
from .errors import UserError
from .problem import resolve_pattern
from .registry import get_solver
from .zeroshot import check_tasks

# The quick protocol (the default) finishes in minutes on 2 CPU cores: small calibration, 24 evaluation
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
    shards: int = 1                        # calibration chunks and row slices; ranks divide it (distributed)

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
