"""Finished runs of a long benchmark, kept as they finish, so an interrupted one resumes.

One JSON line per finished run, after a first line holding the settings the runs were made
with: a rerun with the same settings skips what is there; with other settings the old runs
mean nothing for it, and the file starts over. Whoever writes the report deletes the file
after writing it (:func:`discard`), so a kill between the two loses nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


class FinishedRuns:
    def __init__(self, path: Path | None, settings: dict):
        self.path = None if path is None else Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        self.done: dict[int, dict] = {}
        if self.path is None:
            return
        if self.path.exists():
            lines = self.path.read_text(errors="replace").splitlines()
            if _entry(lines[0] if lines else "", "settings") == self.settings:
                for line in lines[1:]:
                    run, result = _entry(line, "run"), _entry(line, "result")
                    if run is None or result is None:  # the line being written when the run was killed
                        break
                    self.done[run] = result
                tqdm.write(f"resuming: {len(self.done)} finished runs read from {self.path}")
                return
            tqdm.write(f"{self.path} holds runs made with other settings: starting over")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"settings": self.settings}) + "\n")

    def add(self, run: int, result: dict) -> None:
        self.done[run] = result
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"run": run, "result": result}) + "\n")


def progress_file_for(report: Path) -> Path:
    """Where the finished runs of the benchmark writing ``report`` wait."""
    return report.with_name(report.name + ".partial.jsonl")


def discard(path: Path | None) -> None:
    """The report is written: its finished runs are no longer needed."""
    if path is not None:
        Path(path).unlink(missing_ok=True)


def _entry(line: str, field: str):
    """``field`` of one JSON line, or None where the line is not a complete one."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry.get(field) if isinstance(entry, dict) else None
