"""The simulator's hardware cost model: one link between the slow and the fast tier, and
a compute time per MoE layer. Presets describe common links; ``measure_disk`` reads a
file with the page cache bypassed to get this machine's own figure."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass

from specmoe.errors import InputError


@dataclass(frozen=True)
class HardwareProfile:
    """Link and compute figures for a simulation."""

    name: str
    bandwidth_bytes_per_s: float
    """Sustained slow-to-fast tier bandwidth."""
    latency_s: float
    """Fixed cost per transfer (driver, DMA setup, I/O submission)."""
    compute_s_per_layer: float
    """Time to run one MoE layer (attention + experts) for the decode batch once weights are resident."""

    def transfer_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


# Effective (not theoretical) figures; compute time is a typical single-batch decode layer on a
# current datacenter GPU for a Mixtral-class layer. Override any field on the command line.
PRESETS = {
    "pcie4": HardwareProfile("pcie4", 25e9, 10e-6, 250e-6),
    "pcie5": HardwareProfile("pcie5", 50e9, 10e-6, 250e-6),
    "nvme": HardwareProfile("nvme", 3.5e9, 80e-6, 250e-6),
}


def preset(name: str, **overrides) -> HardwareProfile:
    if name not in PRESETS:
        raise InputError(f"unknown hardware preset {name!r}; presets: {', '.join(PRESETS)} (or measure the host)")
    fields = {**PRESETS[name].to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    return HardwareProfile(**fields)


def measure_disk(num_bytes: int = 256 << 20, chunk: int = 8 << 20, directory: str | None = None) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of reading a fresh file with the page cache bypassed
    (O_DIRECT where the filesystem allows it, else the cache is dropped for the file first).
    The file lives in a temporary directory whose removal is armed before it is written."""
    import mmap

    with tempfile.TemporaryDirectory(dir=directory, prefix="specmoe-disk-probe-") as tmp:
        path = os.path.join(tmp, "probe.bin")
        block = os.urandom(chunk)
        with open(path, "wb") as handle:
            handle.writelines(block for _ in range(num_bytes // chunk))
        os.sync()
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
            start = time.perf_counter()
            total = 0
            while (got := os.readv(fd, [buffer])) > 0:
                total += got
            elapsed = time.perf_counter() - start
            os.lseek(fd, 0, os.SEEK_SET)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            small = mmap.mmap(-1, 4096)
            lat = []
            for offset in range(0, min(total, 64 * chunk), chunk):
                os.lseek(fd, offset, os.SEEK_SET)
                t = time.perf_counter()
                os.readv(fd, [small])
                lat.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    return total / elapsed, sorted(lat)[len(lat) // 2]


def measured_profile(compute_s_per_layer: float) -> HardwareProfile:
    bandwidth, latency = measure_disk()
    return HardwareProfile("measured-disk", bandwidth, latency, compute_s_per_layer)
