"""The slow tier on CPU: expert weights in files on disk, read with the page cache bypassed.

One file per MoE layer; expert e's tensors sit back to back at a 4 KiB-aligned offset, so
each expert is one O_DIRECT read (or a few, for a read that may pause: see below). Where O_DIRECT is refused (tmpfs, some containers), the
file is read normally and its pages are dropped with ``posix_fadvise(DONTNEED)`` after
every read, so a later read goes to the device again.

Reads land in reused buffers (:class:`ReadBuffers`): faulting in a fresh buffer for every
read (2305 page faults for a 9 MiB expert) took about as long as the read itself on the VM
this was developed on, and that is CPU work, so it also slowed whatever computed beside it.

A read may be asked to pause between chunks of :data:`CHUNK` bytes (``between_chunks``): the
prefetcher does, so that a demand read, which decoding is waiting for, has the disk to
itself (two reads at once share the disk, and only one is being waited for).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specmoe.errors import CorruptStoreError

ALIGN = 4096
CHUNK = 2 << 20
"""Bytes per read call of a pausable read: about a millisecond of disk time on the VM this
was measured on, where 2 MiB reads cost 8% more than one 9 MiB read (1 MiB ones: 20%)."""
INDEX = "experts.json"


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertLayout:
    shapes: list[list[int]]
    dtype: str
    nbytes: int  # of one expert, unpadded
    stride: int  # bytes between consecutive experts in the file


class ReadBuffers:
    """4 KiB-aligned read buffers, each reused once no tensor views it any more.

    A lent buffer is a numpy slice that only the tensors made from it keep alive (torch
    holds the array it wraps), so its death, seen through a weak reference, is exactly the
    moment nothing can read the old contents: the fast tier evicts without telling anyone,
    and a layer still computing on an evicted expert keeps that expert's buffer to itself.
    """

    def __init__(self):
        self._free_when_dead: dict[int, list[tuple[np.ndarray, weakref.ref | None]]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (a multiple of 4 KiB) at a 4 KiB-aligned address."""
        with self._lock:
            slots = self._free_when_dead.setdefault(nbytes, [])
            index = next((i for i, (_, lent) in enumerate(slots) if lent is None or lent() is None), None)
            if index is None:
                slots.append((np.empty(nbytes + ALIGN, dtype=np.uint8), None))
                index = len(slots) - 1
            memory = slots[index][0]
            start = (-memory.ctypes.data) % ALIGN
            view = memory[start : start + nbytes]
            slots[index] = (memory, weakref.ref(view))
            return torch.from_numpy(view)

    def reserve(self, nbytes: int, count: int) -> None:
        """Hold ``count`` buffers of ``nbytes``, their memory faulted in now rather than
        during the first reads (a server's steady state, which a benchmark should time)."""
        with self._lock:
            slots = self._free_when_dead.setdefault(nbytes, [])
            while len(slots) < count:
                memory = np.empty(nbytes + ALIGN, dtype=np.uint8)
                memory.fill(0)
                slots.append((memory, None))

    def __len__(self) -> int:
        return sum(len(slots) for slots in self._free_when_dead.values())


class ExpertFiles:
    """Read access to experts written by :func:`write_experts`. Keys are ``(layer_idx,
    expert_idx)``. Each expert's bytes are checked against the CRC-32 written with them on
    its first read in this process (about 2 ms per 9 MiB here, against a read of about 5
    ms: once, not on every read); a mismatch is an error naming the file, never used."""

    fresh_reads = True
    """Every ``read`` returns newly read tensors, which the fast tier can keep as they are."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        try:
            index = json.loads(index_path.read_text())
            self.layout = {int(k): ExpertLayout(**v) for k, v in index["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptStoreError(
                f"{index_path}: not a readable expert index ({exc}); write the store again"
            ) from None
        self.checksums = {int(k): v for k, v in index.get("crc32", {}).items()}
        self.source = index.get("source", {})
        self._verified: set[tuple[int, int]] = set()
        self._fds: dict[int, int] = {}
        self.buffers = ReadBuffers()

    @staticmethod
    def write(directory: Path, layers: dict[int, list[list[torch.Tensor]]]) -> ExpertFiles:
        """``layers[layer_idx][expert_idx]`` = that expert's tensors (all one dtype)."""
        return write_experts(directory, {g: len(experts) for g, experts in layers.items()}, lambda g, e: layers[g][e])

    def expert_nbytes(self, layer: int) -> int:
        return self.layout[layer].nbytes

    def reserve_buffers(self, experts: int) -> None:
        """Enough read buffers, faulted in, for ``experts`` experts of each layer's size to
        be held at once: a fast tier's worth plus the reads in flight."""
        for stride in {layout.stride for layout in self.layout.values()}:
            self.buffers.reserve(stride, experts)

    def _path(self, layer: int) -> Path:
        return self.directory / f"layer-{layer:04d}.bin"

    def _fd(self, layer: int) -> tuple[int, bool]:
        if layer not in self._fds:
            path = str(self._path(layer))
            if not os.path.exists(path):
                raise CorruptStoreError(f"{path}: an expert file of the store is missing; write the store again")
            try:
                self._fds[layer] = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                self._direct = getattr(os, "O_DIRECT", 0) != 0
            except OSError:
                self._fds[layer] = os.open(path, os.O_RDONLY)
                self._direct = False
        return self._fds[layer], getattr(self, "_direct", False)

    def read(self, layer: int, expert: int, between_chunks: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """Read one expert from disk (never from the page cache); returns new CPU tensors.
        With ``between_chunks``, the read is split into :data:`CHUNK`-sized calls and that
        function runs between them (it may block, to let another read go first)."""
        layout = self.layout[layer]
        offset = expert * layout.stride
        # Straight into an aligned buffer (O_DIRECT needs the alignment); reading in place, with
        # no bytes objects, keeps the GIL free while the disk works.
        buffer = self.buffers.take(layout.stride)
        array = buffer.numpy()
        step = layout.stride if between_chunks is None else CHUNK
        for start in range(0, layout.stride, step):
            if start:
                between_chunks()
            got = self._pread(layer, array[start : start + step], offset + start)
            if got < min(step, layout.nbytes - start):  # the padding after the tensors may be cut
                raise CorruptStoreError(
                    f"{self._path(layer)}: expert {expert} ends past the file ({start + got} of its "
                    f"{layout.nbytes} bytes); the store was cut short: write it again"
                )
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(layer)[0], offset, layout.stride, os.POSIX_FADV_DONTNEED)
        if (layer, expert) not in self._verified and layer in self.checksums:
            if zlib.crc32(array[: layout.nbytes]) != self.checksums[layer][expert]:
                raise CorruptStoreError(
                    f"{self._path(layer)}: expert {expert}'s bytes do not match their checksum (corrupt); "
                    f"delete {self.directory} and write it again"
                )
            self._verified.add((layer, expert))
        flat = buffer[: layout.nbytes].view(getattr(torch, layout.dtype))
        tensors, start = [], 0
        for shape in layout.shapes:
            count = int(torch.Size(shape).numel())
            tensors.append(flat[start : start + count].view(shape))
            start += count
        return tensors

    def _pread(self, layer: int, into: np.ndarray, offset: int) -> int:
        fd, _direct = self._fd(layer)
        try:
            return os.preadv(fd, [into], offset)
        except OSError:  # O_DIRECT refused for this read: fall back to a cached read + drop
            os.close(fd)
            self._fds[layer] = fd = os.open(str(self.directory / f"layer-{layer:04d}.bin"), os.O_RDONLY)
            return os.preadv(fd, [into], offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.buffers = ReadBuffers()  # the old ones go as the last tensors viewing them do


def write_experts(
    directory: Path,
    experts_per_layer: dict[int, int],
    make_expert: Callable[[int, int], list[torch.Tensor]],
    *,
    source: dict | None = None,
    progress: bool = False,
) -> ExpertFiles:
    """Write every expert, one at a time (``make_expert(layer, expert)`` gives its tensors,
    all one dtype, the same shapes for every expert of a layer), each at a 4 KiB-aligned
    offset of its layer's file, with its CRC-32; the index goes last, so a directory without
    one was not finished. Memory: one expert. Tensors returned twice in a row (the same
    objects) are serialised once."""
    from tqdm import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index, checksums = {}, {}
    bar = tqdm(total=sum(experts_per_layer.values()), desc="write experts", unit="expert", disable=not progress)
    for layer, count in experts_per_layer.items():
        first = make_expert(layer, 0)
        nbytes = sum(t.numel() * t.element_size() for t in first)
        stride = _aligned(nbytes)
        sums = []
        with (directory / f"layer-{layer:04d}.bin").open("wb") as handle:
            previous, blob = None, b""
            for e in range(count):
                tensors = first if e == 0 else make_expert(layer, e)
                if tensors is not previous:
                    blob = b"".join(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in tensors)
                    if len(blob) != nbytes:
                        raise ValueError(f"expert ({layer}, {e}) has {len(blob)} bytes, the layer's first {nbytes}")
                    crc = zlib.crc32(blob)
                    blob += b"\0" * (stride - len(blob))
                    previous = tensors
                handle.write(blob)
                sums.append(crc)
                bar.update()
            handle.flush()
            os.fsync(handle.fileno())
        index[layer] = {
            "shapes": [list(t.shape) for t in first],
            "dtype": str(first[0].dtype).removeprefix("torch."),
            "nbytes": nbytes,
            "stride": stride,
        }
        checksums[layer] = sums
    bar.close()
    tmp = directory / f".{INDEX}.tmp"
    tmp.write_text(json.dumps({"layers": index, "crc32": checksums, "source": source or {}}, indent=1))
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / INDEX)
    return ExpertFiles(directory)


class MappedExperts(ExpertFiles):
    """The same files memory-mapped, read through the operating system's page cache with no
    copy (what llama.cpp does with its weights): the kernel, not a fast tier of ours, decides
    what stays in memory. The baseline that :mod:`specmoe.bench.model_offload` compares with."""

    def __init__(self, directory: Path):
        import mmap

        super().__init__(directory)
        self._maps = {}
        for layer in self.layout:
            with self._path(layer).open("rb") as handle:
                self._maps[layer] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def reserve_buffers(self, experts: int) -> None:
        pass  # nothing is read into buffers of ours

    def read(self, layer: int, expert: int, between_chunks=None) -> list[torch.Tensor]:
        layout = self.layout[layer]
        raw = np.frombuffer(self._maps[layer], dtype=np.uint8, count=layout.nbytes, offset=expert * layout.stride)
        with warnings.catch_warnings():  # read-only memory, and nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(raw).view(getattr(torch, layout.dtype))
        tensors, start = [], 0
        for shape in layout.shapes:
            count = int(torch.Size(shape).numel())
            tensors.append(flat[start : start + count].view(shape))
            start += count
        return tensors

    def close(self) -> None:
        self._maps.clear()  # each map closes as the last tensor viewing it goes
