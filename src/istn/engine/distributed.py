"""Several processes under ``torchrun``: process group, sharding and gathering.

``torchrun --nproc_per_node=N -m istn train ...`` starts N processes that set the
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` environment variables; :func:`setup`
joins them into one process group (gloo on the CPU, NCCL on CUDA, each process on
GPU ``LOCAL_RANK``). Without those variables everything here is a no-op for one
process, so the engine has a single code path.

Conventions: rank 0 is the only process that writes logs, checkpoints and merged
results; work lists are sharded round-robin (``items[rank::world]``), and merged
results come back in the original order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import IstnError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` processes (``world == 1``: a plain run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True for the process that writes outputs (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise IstnError(f"environment variable {name}={value!r} is not an integer; "
                        "start several processes with torchrun, which sets it") from None


def from_env() -> Dist:
    """The place torchrun gave this process (RANK, WORLD_SIZE, LOCAL_RANK), or SINGLE."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise IstnError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return Dist(rank, world, local)


def current() -> Dist:
    """This process's Dist once :func:`setup` has joined a group, else SINGLE."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return SINGLE


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (if any); returns (Dist, this process's device).

    On CUDA each process uses GPU ``LOCAL_RANK`` (whatever index ``device`` named)
    with the NCCL backend; on the CPU the gloo backend. The timeout for a collective
    is ``ISTN_DIST_TIMEOUT_MIN`` minutes (default 60): rank 0 validates and writes
    checkpoints while the others wait.
    """
    d = from_env()
    if not d.active:
        return d, device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if d.local_rank >= count:
            raise IstnError(f"torchrun started process LOCAL_RANK={d.local_rank} but only "
                            f"{count} CUDA device(s) exist; use --nproc_per_node <= {count}")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=_env_int("ISTN_DIST_TIMEOUT_MIN", 60))
        dist.init_process_group(backend, timeout=timeout)
    return current(), device


def teardown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list[T], d: Dist) -> list[T]:
    """This process's share of ``items``: every ``world``-th item from ``rank``."""
    return items[d.rank::d.world]


def gather(items: list[T], d: Dist) -> list[T] | None:
    """Merge every process's shard (from :func:`shard`) in the original order on rank 0.

    Returns the full list on rank 0 and None elsewhere; a no-op for one process.
    """
    if not d.active:
        return items
    parts: list[Any] | None = [None] * d.world if d.main else None
    dist.gather_object(items, parts, dst=0)
    return interleave(parts) if d.main else None


def interleave(parts: list[list[T]]) -> list[T]:
    """Undo :func:`shard`: ``parts[r]`` holds items r, r + world, ... of the original list."""
    return [p[i] for i in range(max(map(len, parts), default=0)) for p in parts if i < len(p)]


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over all processes (in place; returned for chaining)."""
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def broadcast(obj: T, d: Dist) -> T:
    """Rank 0's ``obj`` on every process."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def select_device(dev: str | int | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or an integer N (CUDA device N); default: cuda:0 if present."""
    if dev is None or dev == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    name = f"cuda:{dev}" if str(dev).isdigit() else str(dev)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise IstnError(f"--dev/--device '{dev}' is not a device; "
                        "use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise IstnError(f"--dev/--device '{dev}': no CUDA device is available; use cpu")
        if (device.index or 0) >= count:
            raise IstnError(f"--dev/--device '{dev}': only {count} CUDA device(s) exist "
                            f"(0..{count - 1})")
    elif device.type != "cpu":
        raise IstnError(f"--dev/--device '{dev}' is not supported; use cpu or cuda[:N]")
    return device
