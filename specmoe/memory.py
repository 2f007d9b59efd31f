"""The process's resident memory, as the kernel counts it (Linux ``/proc/self/status``)."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _field(name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """The most this process has had resident (``VmHWM``); None where the kernel does not say."""
    return _field("VmHWM")


def rss_bytes() -> int | None:
    """What this process has resident now (``VmRSS``)."""
    return _field("VmRSS")


def available_bytes() -> int | None:
    """Memory the machine can still give without swapping (``MemAvailable``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start the peak over from what is resident now (``echo 5 > /proc/self/clear_refs``), so
    that one process can measure the peak of several runs in turn; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
