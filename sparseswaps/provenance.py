"""Where a result came from: package versions, the git commit (and whether the tree was dirty), a digest of the
package's code, peak memory."""
from __future__ import annotations

import hashlib
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
            "git_dirty": None if changes is None else bool(changes), "source_sha256": source_digest(),
            "python": platform.python_version(),
            "platform": platform.platform(), "packages": versions,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def source_digest(package: Path = Path(__file__).parent) -> str:
    """SHA-256 over the package's Python files (relative path and bytes, in path order): names the code that
    ran where git cannot (a copied tree on a stale .git). Compare with this function at a checkout of the
    commit in question."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
