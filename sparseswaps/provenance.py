"""Where a result came from: package versions, the git commit (and whether the tree was dirty), peak memory."""
from __future__ import annotations

import platform
import resource
import subprocess
from pathlib import Path

import torch

from . import __version__

def reset_peaks(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """Peak host RSS of this process and peak GPU memory allocated by torch, in GiB."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # kilobytes on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_host_gib": host, "peak_gpu_gib": gpu}


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
