"""The slow tier on CPU: expert weights in files on disk, read with the page cache bypassed.

One file per MoE layer; expert e's tensors sit back to back at a 4 KiB-aligned offset, so
each expert is one O_DIRECT read. Where O_DIRECT is refused (tmpfs, some containers), the
file is read normally and its pages are dropped with ``posix_fadvise(DONTNEED)`` after
every read, so a later read goes to the device again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

ALIGN = 4096
INDEX = "experts.json"


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ExpertLayout:
    shapes: list[list[int]]
    dtype: str
    nbytes: int  # of one expert, unpadded
    stride: int  # bytes between consecutive experts in the file


class ExpertFiles:
    """Read access to experts written by :meth:`write`. Keys are ``(layer_idx, expert_idx)``."""

    fresh_reads = True
    """Every ``read`` returns newly read tensors, which the fast tier can keep as they are."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = json.loads((self.directory / INDEX).read_text())
        self.layout = {int(k): ExpertLayout(**v) for k, v in index["layers"].items()}
        self.direct = index.get("direct", True)
        self._fds: dict[int, int] = {}

    @staticmethod
    def write(directory: Path, layers: dict[int, list[list[torch.Tensor]]]) -> ExpertFiles:
        """``layers[layer_idx][expert_idx]`` = that expert's tensors (all one dtype)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = {}
        for layer, experts in layers.items():
            first = experts[0]
            nbytes = sum(t.numel() * t.element_size() for t in first)
            stride = _aligned(nbytes)
            with (directory / f"layer-{layer:04d}.bin").open("wb") as handle:
                previous, blob = None, b""
                for tensors in experts:
                    if tensors is not previous:  # the same tensors repeated are serialised once
                        blob = b"".join(
                            t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in tensors
                        )
                        blob += b"\0" * (stride - len(blob))
                        previous = tensors
                    handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            index[layer] = {
                "shapes": [list(t.shape) for t in first],
                "dtype": str(first[0].dtype).removeprefix("torch."),
                "nbytes": nbytes,
                "stride": stride,
            }
        (directory / INDEX).write_text(json.dumps({"layers": index}, indent=2))
        return ExpertFiles(directory)

    def expert_nbytes(self, layer: int) -> int:
        return self.layout[layer].nbytes

    def _fd(self, layer: int) -> tuple[int, bool]:
        if layer not in self._fds:
            path = str(self.directory / f"layer-{layer:04d}.bin")
            try:
                self._fds[layer] = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
                self._direct = getattr(os, "O_DIRECT", 0) != 0
            except OSError:
                self._fds[layer] = os.open(path, os.O_RDONLY)
                self._direct = False
        return self._fds[layer], getattr(self, "_direct", False)

    def read(self, layer: int, expert: int) -> list[torch.Tensor]:
        """Read one expert from disk (never from the page cache); returns new CPU tensors."""
        layout = self.layout[layer]
        fd, _direct = self._fd(layer)
        offset = expert * layout.stride
        # Straight into a 4 KiB-aligned slice of a fresh tensor: O_DIRECT needs the alignment,
        # and reading in place (no bytes objects) keeps the GIL free while the disk works.
        raw = torch.empty(layout.stride + ALIGN, dtype=torch.uint8)
        start = (-raw.data_ptr()) % ALIGN
        buffer = raw[start : start + layout.stride]
        try:
            got = os.preadv(fd, [buffer.numpy()], offset)
        except OSError:  # O_DIRECT refused for this read: fall back to a cached read + drop
            os.close(fd)
            self._fds[layer] = fd = os.open(str(self.directory / f"layer-{layer:04d}.bin"), os.O_RDONLY)
            got = os.preadv(fd, [buffer.numpy()], offset)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, layout.stride, os.POSIX_FADV_DONTNEED)
        if got < layout.nbytes:
            raise OSError(f"{self.directory}: short read of expert ({layer}, {expert}): {got} bytes")
        flat = buffer[: layout.nbytes].view(getattr(torch, layout.dtype))
        tensors, start = [], 0
        for shape in layout.shapes:
            count = int(torch.Size(shape).numel())
            tensors.append(flat[start : start + count].view(shape))
            start += count
        return tensors

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
