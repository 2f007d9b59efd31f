"""Where a model's routed experts are read from, one at a time, when they do not fit in memory.

- :func:`prepare_store`: an aligned expert store (:class:`~.expert_files.ExpertFiles`),
  written once from the checkpoint by streaming it expert by expert (memory: one expert,
  or one checkpoint tensor where a converter needs a whole one), kept in a cache directory
  keyed by the checkpoint, and reused by every later run. A store is written into a
  ``.partial`` directory that is renamed when complete; one without a finished index, from
  another checkpoint or another dtype is never used: it is rebuilt.
- :class:`CheckpointExperts`: the experts read straight from the checkpoint's safetensors
  files at their byte ranges, with no store; possible when every expert tensor is such a
  range or several of them back to back (no dtype change, no converter beyond stacking and
  concatenating). ``docs/offloading.md`` says which is faster here and why it is the default.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from specmoe.errors import CorruptStoreError, InputError
from specmoe.models.offloaded import OffloadedModel
from specmoe.offload.live.expert_files import ExpertFiles, ReadBuffers, write_experts

STORE_FORMAT = 1


def cache_root() -> Path:
    """``$SPECMOE_CACHE``, else ``$XDG_CACHE_HOME/specmoe``, else ``~/.cache/specmoe``."""
    if os.environ.get("SPECMOE_CACHE"):
        return Path(os.environ["SPECMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specmoe"


def default_store(model: OffloadedModel) -> Path:
    """The store of this checkpoint and dtype in the cache: one per checkpoint fingerprint."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model.loaded.model_id.strip("/")).strip("-")[-60:] or "model"
    dtype = str(model.dtype).removeprefix("torch.")
    return cache_root() / "experts" / f"{name}-{model.checkpoint.fingerprint()}-{dtype}"


def store_source(model: OffloadedModel) -> dict:
    """What a store was made from; a store whose record differs is stale."""
    return {
        "format": STORE_FORMAT,
        "checkpoint": model.checkpoint.fingerprint(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "layers": len(model.loaded.layers),
        "experts": model.loaded.num_experts,
        "expert_nbytes": [model.expert_nbytes(g) for g in range(len(model.loaded.layers))],
    }


def open_store(directory: Path, model: OffloadedModel) -> ExpertFiles | None:
    """The finished store in ``directory`` made from ``model``'s checkpoint in its dtype, or
    None if there is none (or it is stale or cut short: it is then to be rebuilt)."""
    if not (directory / "experts.json").is_file():
        return None
    try:
        files = ExpertFiles(directory)
    except CorruptStoreError:
        return None
    if files.source != store_source(model):
        return None
    for layer, layout in files.layout.items():
        path = directory / f"layer-{layer:04d}.bin"
        if not path.is_file() or path.stat().st_size != layout.stride * model.loaded.num_experts:
            return None
    return files


def prepare_store(
    model: OffloadedModel, directory: Path | None = None, *, progress: bool = True, log: Callable[[str], None] = print
) -> ExpertFiles:
    """The expert store of ``model`` in ``directory`` (default: :func:`default_store`),
    written now unless a finished, current one is there."""
    directory = Path(directory) if directory is not None else default_store(model)
    found = open_store(directory, model)
    if found is not None:
        return found
    if directory.exists():
        log(f"{directory} holds a stale or unfinished expert store: rebuilding it")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a prepare killed before it finished
    layers = range(len(model.loaded.layers))
    needed = sum(model.expert_nbytes(g) for g in layers) * model.loaded.num_experts
    partial.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(partial.parent).free
    if free < needed:
        raise InputError(
            f"the expert store needs {needed / 2**30:.1f} GiB and {partial.parent} has {free / 2**30:.1f} GiB free; "
            "free some space or give another --store DIR"
        )
    log(f"writing the expert store of {model.loaded.model_id} ({needed / 2**30:.2f} GiB) to {directory}")
    try:
        write_experts(
            partial,
            {g: model.loaded.num_experts for g in layers},
            model.expert_tensors,
            source=store_source(model),
            progress=progress,
        )
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise InputError(
                f"the disk of {partial.parent} filled while writing the expert store (it needs {needed / 2**30:.1f} "
                "GiB); free some space or give another --store DIR"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    return ExpertFiles(directory)


class CheckpointExperts:
    """The experts of ``model`` read straight from its checkpoint's safetensors files: each
    tensor's byte ranges read back to back into one buffer (buffered reads, the pages
    dropped from the page cache after each), with no store written."""

    fresh_reads = True

    def __init__(self, model: OffloadedModel):
        self.model = model
        self.ranges = {}
        for g in range(len(model.loaded.layers)):
            for e in range(model.loaded.num_experts):
                ranges = model.expert_ranges(g, e)
                if ranges is None:
                    raise InputError(
                        f"{model.checkpoint.directory}: its experts are not stored as the model holds them (a "
                        "conversion or another dtype); write an expert store with `specmoe prepare`"
                    )
                self.ranges[g, e] = ranges
        self.shapes = {g: [tuple(v.shape) for _, v in model.recipes[g][0]] for g in range(len(model.loaded.layers))}
        self.buffers = ReadBuffers()
        self._fds: dict[Path, int] = {}

    def expert_nbytes(self, layer: int) -> int:
        return self.model.expert_nbytes(layer)

    def reserve_buffers(self, experts: int) -> None:
        for nbytes in {self.expert_nbytes(g) for g in self.shapes}:
            self.buffers.reserve(_aligned(nbytes), experts)

    def read(self, layer: int, expert: int, between_chunks=None) -> list[torch.Tensor]:
        nbytes = self.expert_nbytes(layer)
        buffer = self.buffers.take(_aligned(nbytes))
        array = buffer.numpy()
        start = 0
        for parts in self.ranges[layer, expert]:
            for part in parts:
                if start and between_chunks is not None:
                    between_chunks()
                fd = self._fd(part.path)
                got = os.preadv(fd, [array[start : start + part.nbytes]], part.offset)
                if got != part.nbytes:
                    raise CorruptStoreError(f"{part.path}: truncated; download the checkpoint again")
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, part.offset, part.nbytes, os.POSIX_FADV_DONTNEED)
                start += part.nbytes
        flat = buffer[:nbytes].view(self.model.dtype)
        tensors, at = [], 0
        for shape in self.shapes[layer]:
            count = int(np.prod(shape))
            tensors.append(flat[at : at + count].view(shape))
            at += count
        return tensors

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _aligned(n: int) -> int:
    return (n + 4095) // 4096 * 4096
