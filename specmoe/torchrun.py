"""Process-group setup under ``torchrun``, shared by training and collection.

``torchrun`` starts one process per rank and tells each who it is through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). A plain ``python -m specmoe``
run has none of these and is world 1: no process group, nothing to synchronise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from specmoe.errors import PeerError, SpecmoeError

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init_process_group() -> tuple[int, int]:
    """Join the job's process group (nccl on GPUs, gloo on CPUs); returns (rank, world size)."""
    world = world_size()
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())  # nccl needs each rank on its own device
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world


class ControlChannel:
    """Barriers and small messages between the ranks of a job, over gloo whatever the main
    backend is, with a long timeout: a rank that finished its share waits for the slowest one,
    which after a resume can be hours behind (the default timeout is 30 minutes)."""

    def __init__(self, world: int, timeout: timedelta = timedelta(days=30)):
        """World 1 (no torchrun): a channel to nobody, so callers need no special case."""
        self.rank = dist.get_rank() if world > 1 else 0
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 alone and hand every rank its result, or its error: rank 0
        raises the error itself, the others raise :class:`PeerError` (reported by rank 0)."""
        if self.group is None:
            return fn()
        message: list = [None]
        if self.rank == 0:
            try:
                message = [("ok", fn())]
            except SpecmoeError as exc:
                message = [("error", str(exc))]
                dist.broadcast_object_list(message, src=0, group=self.group)
                raise
        dist.broadcast_object_list(message, src=0, group=self.group)
        status, value = message[0]
        if status == "error":
            raise PeerError(value)
        return value
