"""Bookkeeping of a collection sharded over the processes of a ``torchrun`` job.

Shard i goes to rank ``i % world``; every rank plans the same deterministic window stream
and keeps only its own shards, so the shards are exactly those of a one-process run. Ranks
write shard files straight into the store and record them in a manifest of their own,
``.ranks/rank-RRRRR-of-WWWWW/manifest.json``; when all are done, rank 0 lists every shard,
in index order, in the store's manifest and removes ``.ranks``. A killed job resumes on the
same command: each rank skips the shards its manifest lists. The rank count is part of that
record, so a resume with another count is refused rather than guessed at.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from specmoe.errors import CorruptStoreError, InputError
from specmoe.traces.schema import Manifest
from specmoe.traces.store import TraceStore

RANKS_DIR = ".ranks"
_RANK_DIR = re.compile(r"^rank-(\d+)-of-(\d+)$")
_SHARD_FILE = re.compile(r"^\.?shard-(\d+)\.")


def owns(shard_index: int, rank: int, world: int) -> bool:
    return shard_index % world == rank


def rank_directory(out: Path, rank: int, world: int) -> Path:
    return out / RANKS_DIR / f"rank-{rank:05d}-of-{world:05d}"


def started_world_size(out: Path, manifest: Manifest) -> int | None:
    """How many processes the unfinished collection in ``out`` was started with (None: not started)."""
    worlds = {int(m[2]) for d in (out / RANKS_DIR).glob("rank-*") if (m := _RANK_DIR.match(d.name))}
    if len(worlds) > 1:
        raise CorruptStoreError(f"{out / RANKS_DIR}: progress of jobs with {sorted(worlds)} processes is mixed")
    if worlds:
        return worlds.pop()
    return 1 if manifest.shards else None


def check_world_size(out: Path, manifest: Manifest, world: int) -> None:
    """A resume must use the rank count the collection started with: shards are assigned by it."""
    if manifest.complete:
        return
    started = started_world_size(out, manifest)
    if started is not None and started != world:
        how = "one process (plain `specmoe collect`)" if started == 1 else f"{started} processes (torchrun)"
        raise InputError(
            f"{out} was started by {how} and this run has {world}; resume it with the same number of "
            "processes, or choose another --out"
        )


def check_existing_store(out: Path, world: int) -> None:
    """:func:`check_world_size` for whatever store ``out`` already holds."""
    if (out / "manifest.json").exists():
        check_world_size(out, Manifest.load(out), world)


def open_rank_part(out: Path, fresh: Manifest, rank: int, world: int) -> TraceStore:
    """This rank's view of the store: shard files go into ``out``, their list into the rank's
    own manifest. Files of shards this rank had in flight when killed are removed."""
    directory = rank_directory(out, rank, world)
    if (directory / "manifest.json").exists():
        part = TraceStore(out, Manifest.load(directory), manifest_directory=directory)
        if part.manifest.collection.fingerprint != fresh.collection.fingerprint:
            raise CorruptStoreError(f"{directory}: progress of a collection with other settings")
        part.check_files()
    else:
        directory.mkdir(parents=True, exist_ok=True)
        part = TraceStore(out, fresh.model_copy(deep=True), manifest_directory=directory)
        part.manifest.save(directory)
    done = {shard.index for shard in part.manifest.shards}
    for path in out.iterdir():
        match = _SHARD_FILE.match(path.name)
        if match and path.is_file() and owns(int(match[1]), rank, world) and int(match[1]) not in done:
            path.unlink()
    return part


def assemble(out: Path, world: int) -> None:
    """Rank 0, once every rank is done: list all shards in the store's manifest, in order."""
    store = TraceStore.open(out)
    parts = [Manifest.load(rank_directory(out, rank, world)) for rank in range(world)]
    shards = sorted((shard for part in parts for shard in part.shards), key=lambda shard: shard.index)
    if [shard.index for shard in shards] != list(range(len(shards))):
        raise CorruptStoreError(f"{out}: the ranks' shards do not form one sequence (a rank's progress was lost)")
    store.manifest.shards = shards
    store.manifest.num_tokens = sum(shard.num_tokens for shard in shards)
    if store.manifest.num_tokens == 0:
        raise InputError(f"no text to collect: the sources {store.manifest.collection.texts} hold no tokens")
    store.check_files()
    store.manifest.complete = True
    store.manifest.save(out)
    shutil.rmtree(out / RANKS_DIR)
    store.remove_unlisted_files()
