"""A checkpoint's safetensors shards, read one tensor (or one byte range) at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. The header is all that is needed to
read any tensor, or any slice of one along its first dimension, with one ``pread``: no
memory map (whose touched pages would count as the process's memory), no file held open.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specmoe.errors import InputError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are."""

    path: Path
    offset: int
    """From the start of the file."""
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def rows(self, first: int, count: int) -> TensorEntry:
        """Rows ``[first, first + count)`` along the first dimension: one contiguous range."""
        row = self.nbytes // self.shape[0]
        return TensorEntry(self.path, self.offset + first * row, count * row, self.dtype, (count, *self.shape[1:]))


class SafetensorsCheckpoint:
    """The tensors of the ``*.safetensors`` files in ``directory`` (sharded with an index,
    or not), by checkpoint key."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise InputError(f"{self.directory}: no .safetensors files (specmoe reads safetensors checkpoints only)")
        self.files = [self.directory / name for name in files]
        self.entries: dict[str, TensorEntry] = {}
        for path in self.files:
            self.entries.update(_read_header(path))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, entry: TensorEntry | str) -> torch.Tensor:
        """The tensor (or range) in memory of its own; the pages it came through are dropped
        from the page cache, so a second read goes to the device again and the read leaves
        nothing behind in memory."""
        entry = self.entries[entry] if isinstance(entry, str) else entry
        buffer = np.empty(entry.nbytes, dtype=np.uint8)
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buffer], entry.offset)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if got != entry.nbytes:
            raise InputError(f"{entry.path}: truncated (a tensor's bytes end past the file); download it again")
        return torch.from_numpy(buffer).view(entry.dtype).reshape(entry.shape)

    def fingerprint(self) -> str:
        """What identifies these weights: every shard's name, size and modification time (a
        rewritten checkpoint gets a new one) and every tensor's place in it."""
        digest = hashlib.sha256()
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        for key in sorted(self.entries):
            entry = self.entries[key]
            digest.update(f"{key}:{entry.path.name}:{entry.offset}:{entry.nbytes}:{entry.dtype}\n".encode())
        return digest.hexdigest()[:20]


def _read_header(path: Path) -> dict[str, TensorEntry]:
    if not path.is_file():
        raise InputError(f"{path}: a shard the checkpoint's index names is missing; download it again")
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size, 100 << 20):
            raise InputError(f"{path}: not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}: not a safetensors file (its header is not JSON)") from None
    start = 8 + length
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise InputError(f"{path}: tensor {key} has dtype {info['dtype']}, which specmoe cannot read")
        begin, end = info["data_offsets"]
        if start + end > size:
            raise InputError(f"{path}: truncated ({size} bytes; tensor {key} ends at {start + end}); download it again")
        entries[key] = TensorEntry(path, start + begin, end - begin, DTYPES[info["dtype"]], tuple(info["shape"]))
    return entries
