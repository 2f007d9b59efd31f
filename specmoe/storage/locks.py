"""One writer per output directory, with OS locks that die with their process.

``with DirectoryLock(out, "specmoe collect"):`` holds an ``flock`` on ``out/.specmoe.lock``
for the duration. A second writer gets a :class:`DirectoryLockedError` naming the holder's
pid and command. The kernel drops an ``flock`` when its process dies, however it dies, so a
killed writer never leaves a lock that blocks: the next writer takes it over and rewrites the
holder record.

Cooperating processes of one job (the ranks of a ``torchrun`` job) share the lock: each
passes the same ``job`` id, the first takes the lock exclusively, records the job and turns
it into a shared lock, and later members join only if the record names their job. Each
member also holds ``.specmoe.lock.<member>`` (``rank-3``) exclusively, so two processes can
never act as the same rank. A process outside the job is refused like any second writer.

Locks are reentrant inside one process: a stage that locks a directory its caller already
holds simply nests.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from specmoe.errors import SpecmoeError, storage_error
from specmoe.storage.paths import METADATA_PREFIX

LOCK_FILE = METADATA_PREFIX + ".lock"
JOIN_GRACE_S = 30.0
"""How long a member of a job waits for the job's first member to set the lock up."""
AUTO = "auto"
"""``job=AUTO``: the ``torchrun`` job this process belongs to, if any (:func:`torchrun_job`)."""


class DirectoryLockedError(SpecmoeError):
    """Another process (or another job) is writing to the directory."""


def torchrun_job() -> tuple[str, str] | None:
    """``(job id, member)`` when this process is a rank of a multi-process ``torchrun`` job,
    else None. The id joins the rendezvous id with the master's address and port; a
    single-node job without ``--rdzv-id`` adds the host name, so two such jobs on two hosts
    sharing a file system are not taken for one. A caller that can agree on an id through
    its process group (rank 0 broadcasting a uuid) should pass that instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    address = os.environ.get("MASTER_ADDR", "")
    parts = [run_id, address, os.environ.get("MASTER_PORT", "")]
    if run_id == "none" and address in ("", "localhost", "127.0.0.1", "::1"):
        parts.append(socket.gethostname())
    return ":".join(parts), f"rank-{os.environ.get('RANK', '0')}"


@dataclass
class _Held:
    count: int
    fds: list[int] = field(default_factory=list)
    member_file: Path | None = None


_HELD: dict[str, _Held] = {}


def _describe(record: dict) -> str:
    if not record:
        return "another process (its record is unreadable)"
    text = f"pid {record.get('pid')} on {record.get('host')} ({record.get('purpose')}, since {record.get('since')})"
    return text + (f", job {record['job']}" if record.get("job") else "")


class DirectoryLock:
    """An exclusive (or job-shared) lock on ``directory``, created if missing.

    Args:
        directory: the output directory to guard.
        purpose: what holds it, for the refusal message (``"specmoe collect"``).
        job: processes passing the same id share the lock; ``AUTO`` (default) takes the
            ``torchrun`` job of this process, if any; None: always exclusive.
        member: this process's name inside the job (default: its ``torchrun`` rank).
        join_grace_s: how long a member waits for the job's first member to set the lock up.
    """

    def __init__(
        self,
        directory: str | Path,
        purpose: str,
        *,
        job: str | None = AUTO,
        member: str | None = None,
        join_grace_s: float = JOIN_GRACE_S,
    ):
        self.directory = Path(directory)
        self.join_grace_s = join_grace_s
        self.purpose = purpose
        detected = torchrun_job() if job == AUTO else None
        self.job = detected[0] if detected else (None if job == AUTO else job)
        self.member = member or (detected[1] if detected else None)
        self.first = False
        """Whether this process found the directory unlocked (no other member of its job was
        active): only then may it clear what earlier, killed writers left."""
        self._key: str | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    def holder(self) -> dict:
        """The record of the process that holds (or last held) the lock; {} if unreadable."""
        for _ in range(3):  # the holder may be rewriting it this instant
            try:
                record = json.loads(self.path.read_text())
                return record if isinstance(record, dict) else {}
            except (OSError, ValueError):
                time.sleep(0.05)
        return {}

    def _open(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise storage_error(exc, path) from None

    def _refuse(self, fd: int) -> None:
        os.close(fd)
        raise DirectoryLockedError(
            f"{self.directory} is in use by {_describe(self.holder())}; wait for it to finish or stop it "
            "(a killed process releases the lock by itself), or choose another output directory"
        )

    def acquire(self) -> DirectoryLock:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, self.directory) from None
        self._key = str(self.directory.resolve())
        if self._key in _HELD:
            _HELD[self._key].count += 1
            return self
        fd = self._open(self.path)
        try:
            self._lock(fd)
        except OSError as exc:  # a file system without flock (some network mounts)
            os.close(fd)
            print(f"warning: cannot lock {self.path} ({exc.strerror}); nothing stops a second writer", file=sys.stderr)
            _HELD[self._key] = _Held(1)
            return self
        fds = [fd]
        if self.member is not None:
            member_fd = self._open(self.directory / f"{LOCK_FILE}.{self.member}")
            try:
                fcntl.flock(member_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                os.close(member_fd)
                raise DirectoryLockedError(
                    f"{self.directory}: another process already acts as {self.member} of job {self.job}"
                ) from None
            fds.append(member_fd)
        _HELD[self._key] = _Held(1, fds, self.directory / f"{LOCK_FILE}.{self.member}" if self.member else None)
        return self

    def _lock(self, fd: int) -> None:
        """Exclusive for a lone writer; for a job, exclusive to the first member (who writes
        the record), then shared. Members of the job wait up to ``join_grace_s`` for the first
        to finish that switch."""
        deadline = time.monotonic() + self.join_grace_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.first = True
                self._write_record(fd)
                break
            except BlockingIOError:
                if self.job is None:
                    self._refuse(fd)
                if self.holder().get("job") == self.job and self._try(fd, fcntl.LOCK_SH):
                    break
            if time.monotonic() > deadline:
                self._refuse(fd)
            time.sleep(0.05)
        if self.job is None:
            return
        # Switching exclusive to shared is not atomic: an outsider may slip into the gap, so
        # the record is read back once the shared lock is held.
        while self.first and not self._try(fd, fcntl.LOCK_SH):
            if time.monotonic() > deadline:
                self._refuse(fd)
            time.sleep(0.05)
        if self.holder().get("job") != self.job:
            self._refuse(fd)

    @staticmethod
    def _try(fd: int, mode: int) -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _write_record(self, fd: int) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "job": self.job,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        held = _HELD.get(self._key or "")
        if held is None:
            return
        held.count -= 1
        if held.count == 0:
            del _HELD[self._key]
            if held.member_file is not None:  # a member's own file: nobody else may hold it
                held.member_file.unlink(missing_ok=True)
            for fd in held.fds:
                os.close(fd)  # closing drops the flock; the record stays for the next holder

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
