"""Several processes pruning one model under torchrun: `torchrun --nproc-per-node N -m sparseswaps prune ...`.

torchrun starts the processes, sets RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous; this module only joins
the process group and provides the few collectives the pipeline needs:
- calibration windows are split across ranks in `shards` contiguous chunks (`shards` a multiple of the world
  size), each rank accumulating its chunks' Grams; the chunk Grams are summed in chunk order along the ranks
  (`fold_in_order`), so the Gram does not depend on how many ranks computed it;
- each problem's rows are split into the same `shards` slices, each rank solving its own slices, and the
  pruned rows gathered on every rank (`gather_rows`);
- each rank propagates its own windows; evaluation windows are split the same way and their losses gathered;
- rank 0 owns the checkpoint and the outputs; the other ranks receive its state and block tensors by
  broadcast (`SharedStore`), so nothing but the model's own files needs to be visible to every rank.
A single process with `--shards N` does the same arithmetic as N ranks, so their masks, weights and
perplexities are identical (tests/test_distributed.py runs 2 gloo ranks on CPU and checks this).

NCCL on GPUs, gloo on CPU. A rank that fails exits with its error; torchrun then stops every other rank.
Collectives time out after `timeout_s` (long by default: a rank waits at the gather for the slowest solve).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import UserError

DEFAULT_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks. `SINGLE` is an ordinary process; a process torchrun started
    is `distributed` even alone (one rank then runs every collective, as a check of that path)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    comm_device: torch.device = torch.device("cpu")   # where tensors go through the collectives
    distributed: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> torch.device:
        """The compute device of this rank: its own GPU when the run uses CUDA."""
        device = torch.device(configured)
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def own_shards(self, shards: int, rank: int | None = None) -> range:
        """The shard indices this rank (or `rank`) computes: a contiguous run, in order."""
        per_rank, rank = shards // self.world, self.rank if rank is None else rank
        return range(rank * per_rank, (rank + 1) * per_rank)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextmanager
    def node_leaders_first(self):
        """Local rank 0 of every node runs the block before the node's other ranks (e.g. a conversion into a
        cache on the node's disk, which the others then read)."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def broadcast_object(self, payload=None):
        """Rank 0's `payload` (small Python data: state, records, tensor layouts), on every rank. torch
        pickles it in memory between our own processes; nothing is written or read from disk."""
        if not self.distributed:
            return payload
        box = [payload]
        torch.distributed.broadcast_object_list(box, 0)
        return box[0]

    def gather_objects(self, payload) -> list:
        """Every rank's `payload`, in rank order, on every rank."""
        if not self.distributed:
            return [payload]
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, payload)
        return parts

    def _gather_equal(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return parts

    def gather_rows(self, tensor: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's `tensor` along dim 0 (rank r holds `counts[r]` rows), on every rank."""
        if not self.distributed:
            return tensor
        device, dtype = tensor.device, tensor.dtype
        wire = tensor.to(self.comm_device, torch.uint8 if dtype == torch.bool else dtype)
        padded = torch.zeros((max(counts), *wire.shape[1:]), dtype=wire.dtype, device=self.comm_device)
        padded[:len(wire)] = wire
        parts = self._gather_equal(padded)
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(device, dtype)

    def fold_in_order(self, partials: list[torch.Tensor]) -> torch.Tensor:
        """Σ of every rank's `partials`, added one by one in rank order then list order, on every rank: the
        same additions in the same order as one process summing all of them, whatever the world size."""
        total = None
        if self.rank > 0:
            total = torch.empty_like(partials[0], device=self.comm_device)
            torch.distributed.recv(total, self.rank - 1)
            total = total.to(partials[0].device)
        for partial in partials:
            total = partial.clone() if total is None else total.add_(partial)
        if not self.distributed:
            return total
        if self.rank < self.world - 1:
            torch.distributed.send(total.to(self.comm_device).contiguous(), self.rank + 1)
        wire = total.to(self.comm_device).contiguous()
        torch.distributed.broadcast(wire, self.world - 1)
        return wire.to(partials[0].device)

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Rank 0's named tensors (or None), on every rank (on the communication device)."""
        if not self.distributed:
            return tensors
        layout = self.broadcast_object(None if tensors is None else
                                     {name: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                                      for name, t in tensors.items()})
        if layout is None:
            return None
        received = {}
        for name, (shape, dtype) in layout.items():
            wire = (tensors[name].to(self.comm_device).contiguous() if self.main else
                    torch.empty(shape, dtype=getattr(torch, dtype), device=self.comm_device))
            torch.distributed.broadcast(wire, 0)
            received[name] = wire
        return received

    def leave(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun set up (NCCL for CUDA, gloo otherwise); SINGLE outside torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                            "start at most as many processes per node as there are GPUs")
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                         **({"device_id": torch.device("cuda", local_rank)} if cuda else {}))
    comm = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Ranks(rank, world, local_rank, comm, distributed=True)


def check_shards(shards: int, ranks: Ranks, nsamples: int) -> None:
    if shards < 1:
        raise UserError(f"--shards must be at least 1, got {shards}")
    if shards % ranks.world:
        raise UserError(f"--shards {shards} is not a multiple of the {ranks.world} ranks: give a multiple of "
                        f"{ranks.world} (a run's arithmetic depends on --shards only, never on the rank count)")
    if shards > nsamples:
        raise UserError(f"--shards {shards} exceeds the {nsamples} calibration windows: every shard needs one")


def shard_bounds(count: int, shards: int) -> list[range]:
    """`count` items cut into `shards` contiguous, nearly equal pieces (the first ones one longer)."""
    base, extra = divmod(count, shards)
    bounds, start = [], 0
    for shard in range(shards):
        stop = start + base + (shard < extra)
        bounds.append(range(start, stop))
        start = stop
    return bounds


class SharedStore:
    """The checkpoint store as every rank sees it: rank 0 owns the real one (`local`); the others hold its
    records and saved results, and receive block tensors by broadcast when they read them. Every rank calls
    the methods in the same order (they are collectives)."""

    def __init__(self, local, ranks: Ranks):
        self.local, self.ranks = local, ranks
        state = ranks.broadcast_object({"records": local.records, "saved": local.saved} if ranks.main else None)
        self.records: list[dict] = local.records if ranks.main else state["records"]
        self.saved: dict = local.saved if ranks.main else state["saved"]

    @property
    def next_block(self) -> int:
        return len(self.records)

    def save(self, name: str, payload: dict) -> None:
        if self.ranks.main:
            self.local.save(name, payload)
        else:
            self.saved[name] = payload

    def commit(self, index: int, tensors: dict, masks: dict, record: dict) -> None:
        if self.ranks.main:
            self.local.commit(index, tensors, masks, record)
        else:
            self.records.append(record)

    def overrides(self, index: int) -> dict[str, torch.Tensor]:
        return self.ranks.broadcast_tensors(self.local.overrides(index) if self.ranks.main else {})

    def wait(self) -> None:
        if self.ranks.main:
            self.local.wait()

    def masks(self, index: int) -> dict[str, torch.Tensor]:
        return self.local.masks(index)

    def finish(self) -> None:
        if self.ranks.main:
            self.local.finish()


def shared(store, ranks: Ranks):
    """`store` itself in a single process; a `SharedStore` around it (rank 0) or its followers otherwise."""
    return SharedStore(store, ranks) if ranks.distributed else store
