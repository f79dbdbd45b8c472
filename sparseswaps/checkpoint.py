"""Per-block checkpoints in safetensors and JSON: cheap to write, safe to resume, nothing unpickled.

A checkpoint folder holds
    run.json                   the configuration's fingerprint (written once, first)
    dense.json                 the dense model's perplexities, once measured
    warm_start.json            the warm start's own perplexities (pruned with it alone), when asked for
    block_00007.safetensors    block 7's pruned weights (storage dtype) and bit-packed masks ("mask:<layer>")
    block_00007.json           block 7's commit record: its report rows, timings, and the tensors' SHA-256
Every file is written under a unique temporary name, fsynced and renamed into place. A block counts as done
only once its record exists, and the record is written last, so a kill at any instant leaves either a
committed block or one that is redone. Calibration activations are never written: a resumed run replays the
committed blocks from the calibration inputs, which gives the identical activations.

The write (serialisation, fsync, hash) runs on one background thread while the next block is computed: a
commit snapshots the block's tensors to the CPU and returns; the next commit, any read of a block and
`finish` wait for it first, and an error in the writer surfaces there. Order is unchanged: the record still
follows its tensors, so the kill-safety above holds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .errors import UserError
from .models import file_sha256

FORMAT = 2
_BLOCK_FILE = re.compile(r"block_(\d{5})\.(safetensors|json)$")
_TEMPORARY = re.compile(r".+\.tmp-[A-Za-z0-9_]+$")
RESULTS = ("dense", "warm_start")   # measurements a resumed run need not repeat
MASK_PREFIX = "mask:"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, d] -> uint8 [rows, ceil(d / 8)], eight mask entries per byte (most significant first)."""
    rows, d = mask.shape
    padded = torch.zeros(rows, -(-d // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :d] = mask
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(2, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `pack_mask` for a row width of `d`."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(2) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :d].bool()


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _replace(temporary: Path, target: Path) -> None:
    """The commit of one file: an atomic rename, made durable."""
    os.replace(temporary, target)
    _fsync_dir(target.parent)


def _temporary_beside(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(handle)
    return Path(name)


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, whatever happens meanwhile (kill -9 included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_beside(path)
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    _replace(temporary, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    temporary = _temporary_beside(path)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(temporary),
              metadata=metadata)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    _replace(temporary, path)


class MemoryStore:
    """Pruned blocks kept in memory: a run that cannot be resumed (benchmark matrices on small models)."""

    def __init__(self):
        self.records: list[dict] = []
        self.saved: dict[str, dict] = {}     # RESULTS measured so far
        self._tensors: list[dict[str, torch.Tensor]] = []

    @property
    def next_block(self) -> int:
        return len(self.records)

    def save(self, name: str, payload: dict) -> None:
        self.saved[name] = payload

    def commit(self, index: int, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
               record: dict) -> None:
        self._tensors.append({name: t.detach().cpu().clone() for name, t in tensors.items()}
                             | {MASK_PREFIX + name: pack_mask(mask.cpu()) for name, mask in masks.items()})
        self.records.append(record)

    def _block(self, index: int) -> dict[str, torch.Tensor]:
        return self._tensors[index]

    def wait(self) -> None:
        """Nothing is ever pending in memory."""

    def overrides(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self._block(index).items() if not name.startswith(MASK_PREFIX)}

    def masks(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s bool masks (True = keep), keyed by layer name."""
        tensors = self._block(index)
        return {name[len(MASK_PREFIX):]: unpack_mask(t, tensors[name[len(MASK_PREFIX):] + ".weight"].shape[1])
                for name, t in tensors.items() if name.startswith(MASK_PREFIX)}

    def finish(self) -> None:
        self._tensors.clear()


class DiskStore(MemoryStore):
    """A checkpoint folder (see the module docstring). `open` starts one or resumes it."""

    def __init__(self, folder: Path, fingerprint: str):
        super().__init__()
        self.folder, self.fingerprint = folder, fingerprint
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    @classmethod
    def open(cls, folder: Path, fingerprint: str, resume: bool) -> "DiskStore":
        store = cls(folder, fingerprint)
        started = (folder / "run.json").is_file()
        if started and not resume:
            raise UserError(f"an interrupted run left a checkpoint at {folder}: pass --resume to continue it, "
                            "or remove it to start over")
        if resume and not folder.is_dir():
            raise UserError(f"--resume: no checkpoint at {folder} to resume from")
        if folder.exists() and not folder.is_dir():
            raise UserError(f"checkpoint path {folder} is a file: remove it or choose other outputs")
        if started:
            store._load()
        else:
            store._start()
        return store

    def _start(self) -> None:
        """A fresh folder, or one a run left before its first commit (only temporary files in it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self._listing():
            if not _TEMPORARY.match(path.name):
                raise UserError(f"{self.folder} holds {path.name} but no run.json: it is not a checkpoint of "
                                "this toolkit; remove it or choose other outputs")
            path.unlink()
        write_json_atomic(self.folder / "run.json", {"format": FORMAT, "fingerprint": self.fingerprint})

    def _listing(self) -> list[Path]:
        return sorted(self.folder.iterdir())

    def _load(self) -> None:
        run = self._read_json(self.folder / "run.json")
        if run.get("format") != FORMAT:
            raise UserError(f"the checkpoint at {self.folder} has format {run.get('format')!r}, this version "
                            f"writes {FORMAT}: remove it to start over")
        if run.get("fingerprint") != self.fingerprint:
            raise UserError(f"the checkpoint at {self.folder} was made with a different configuration: resume with "
                            "the same arguments, or remove it to start over")
        numbers = set()
        for path in self._listing():
            match = _BLOCK_FILE.match(path.name)
            if _TEMPORARY.match(path.name):
                path.unlink()   # a write that a kill interrupted before its rename
            elif match:
                numbers.add(int(match.group(1)))
            elif path.name not in ("run.json", *(f"{name}.json" for name in RESULTS)):
                raise UserError(f"the checkpoint at {self.folder} holds a foreign file {path.name}: remove it "
                                "(or the whole checkpoint to start over)")
        for name in RESULTS:
            if (self.folder / f"{name}.json").is_file():
                self.saved[name] = self._read_json(self.folder / f"{name}.json")
        index = 0
        while (self.folder / f"block_{index:05d}.json").is_file():
            self.records.append(self._verified_record(index))
            index += 1
        stray = sorted(n for n in numbers if n > index)
        if stray:
            raise UserError(f"the checkpoint at {self.folder} has block {stray[0]} but not block {index} before it: "
                            "it was changed by hand; remove it to start over")

    def _record_path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.json"

    def _tensor_path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.safetensors"

    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{path} is corrupted ({error}): remove the checkpoint {self.folder} to start over") from None

    def _verified_record(self, index: int) -> dict:
        record = self._read_json(self._record_path(index))
        tensors = self._tensor_path(index)
        if record.get("fingerprint") != self.fingerprint or record.get("block") != index:
            raise UserError(f"{self._record_path(index)} belongs to another run: remove the checkpoint "
                            f"{self.folder} to start over")
        if not tensors.is_file() or tensors.stat().st_size != record["tensors"]["bytes"] \
                or file_sha256(tensors) != record["tensors"]["sha256"]:
            raise UserError(f"{tensors} is missing or does not match its commit record (corrupted or replaced): "
                            f"remove the checkpoint {self.folder} to start over")
        return record["report"]

    def save(self, name: str, payload: dict) -> None:
        write_json_atomic(self.folder / f"{name}.json", payload)
        self.saved[name] = payload

    def commit(self, index: int, tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
               record: dict) -> None:
        """Snapshot block `index`'s tensors and hand them to the writer, which writes them, then the record
        (the commit point)."""
        self.wait()
        snapshot = {name: tensor.detach().cpu() for name, tensor in tensors.items()}
        snapshot |= {MASK_PREFIX + name: pack_mask(mask).cpu() for name, mask in masks.items()}
        self._pending = self._writer.submit(self._write_block, index, snapshot, record)
        self.records.append(record)

    def _write_block(self, index: int, tensors: dict[str, torch.Tensor], record: dict) -> None:
        path = self._tensor_path(index)
        write_safetensors_atomic(path, tensors, metadata={"block": str(index), "fingerprint": self.fingerprint})
        write_json_atomic(self._record_path(index), {
            "block": index, "fingerprint": self.fingerprint,
            "tensors": {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)},
            "report": record})

    def wait(self) -> None:
        """Until the last commit is on disk; re-raises what stopped it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _block(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        self.wait()
        return load_file(str(self._tensor_path(index)))

    def finish(self) -> None:
        self.wait()
        self._writer.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)


def write_masks(path: Path, masks: dict[str, torch.Tensor]) -> None:
    """Packed masks of every layer (uint8, `pack_mask`) with each layer's width in the metadata."""
    widths = {name: int(mask.shape[1]) for name, mask in masks.items()}
    write_safetensors_atomic(path, {name: pack_mask(mask) for name, mask in masks.items()},
                             metadata={"format": "packed-bits", "widths": json.dumps(widths)})


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    """The bool masks (True = keep) a pruned model folder's masks.safetensors holds."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        widths = json.loads(handle.metadata()["widths"])
        return {name: unpack_mask(handle.get_tensor(name), widths[name]) for name in handle.keys()}
