"""Metrics as JSONL (always) and TensorBoard event files (when ``tensorboard`` is installed)."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path | None):
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        self.writer = None
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional: pip install 'specmoe[tensorboard]'
                self.writer = None

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        if self.path:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
