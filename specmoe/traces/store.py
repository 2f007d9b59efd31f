"""Sharded trace store: write shards atomically, read them back one at a time.

Layout of a store directory::

    manifest.json                          # schema.Manifest
    shard-00000.parquet                    # routing of windows_per_shard windows
    shard-00000.router_input.safetensors   # optional, fp16 (T, L, D) per stack
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from specmoe.errors import CorruptStoreError
from specmoe.storage.paths import UnsafePathError, join_inside
from specmoe.traces.schema import FileEntry, Manifest, ShardEntry


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _commit(tmp: Path, final: Path) -> FileEntry:
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    return FileEntry(file=final.name, bytes=final.stat().st_size, sha256=sha256_of(final))


@dataclass
class ShardData:
    """One shard's tokens, for one stack. T tokens, L MoE layers, k experts per token."""

    doc_ids: np.ndarray  # (T,) object (str)
    doc_groups: np.ndarray  # (T,) object (str): split key of the document
    windows: np.ndarray  # (T,) int64, global window index
    positions: np.ndarray  # (T,) int32, position inside the window
    token_ids: np.ndarray  # (T,) int32
    expert_ids: np.ndarray  # (T, L, k) int16, -1 = dropped
    gate_weights: np.ndarray  # (T, L, k) float32

    def __len__(self) -> int:
        return len(self.token_ids)


def routing_table(columns: dict[str, np.ndarray], per_stack: dict[str, tuple[np.ndarray, np.ndarray]]) -> pa.Table:
    """Build a shard's Arrow table; (T, L, k) arrays become fixed-size lists of L*k values."""
    arrays = {
        "doc_id": pa.array(columns["doc_id"]).dictionary_encode(),
        "doc_group": pa.array(columns["doc_group"]).dictionary_encode(),
        "window": pa.array(columns["window"], pa.int64()),
        "position": pa.array(columns["position"], pa.int32()),
        "token_id": pa.array(columns["token_id"], pa.int32()),
    }
    for stack, (ids, weights) in per_stack.items():
        width = ids.shape[1] * ids.shape[2]
        arrays[f"{stack}.expert_ids"] = pa.FixedSizeListArray.from_arrays(
            pa.array(ids.reshape(-1).astype(np.int16)), width
        )
        arrays[f"{stack}.gate_weights"] = pa.FixedSizeListArray.from_arrays(
            pa.array(weights.reshape(-1).astype(np.float32)), width
        )
    return pa.table(arrays)


class TraceStore:
    """A trace store directory, opened for reading (see :meth:`open`) or writing."""

    def __init__(self, directory: Path, manifest: Manifest, *, manifest_directory: Path | None = None):
        self.directory = Path(directory)
        self.manifest = manifest
        self.manifest_directory = Path(manifest_directory or directory)
        """Where :meth:`write_shard` records the manifest: the store itself, or under torchrun
        the rank's own directory (rank 0 assembles the store's manifest at the end)."""

    # --- writing ----------------------------------------------------------------------
    def write_shard(
        self, index: int, table: pa.Table, hidden: dict[str, dict[str, np.ndarray]], first_window: int, num_windows: int
    ) -> ShardEntry:
        """Write one shard (tmp file, fsync, rename), then record it in the manifest."""
        stem = f"shard-{index:05d}"
        tmp = self.directory / f".{stem}.parquet.tmp"
        pq.write_table(table, tmp, compression="zstd")
        routing = _commit(tmp, self.directory / f"{stem}.parquet")
        hidden_entries = {}
        for kind, tensors in hidden.items():
            from safetensors.numpy import save_file

            tmp = self.directory / f".{stem}.{kind}.safetensors.tmp"
            save_file({stack: np.ascontiguousarray(arr, dtype=np.float16) for stack, arr in tensors.items()}, tmp)
            hidden_entries[kind] = _commit(tmp, self.directory / f"{stem}.{kind}.safetensors")
        entry = ShardEntry(
            index=index,
            routing=routing,
            hidden=hidden_entries,
            num_tokens=table.num_rows,
            first_window=first_window,
            num_windows=num_windows,
        )
        self.manifest.shards.append(entry)
        self.manifest.num_tokens += table.num_rows
        self.manifest.save(self.manifest_directory)
        return entry

    def path_of(self, entry: FileEntry) -> Path:
        """Where a manifest entry's file lies: inside the store, or a :class:`CorruptStoreError`."""
        try:
            return join_inside(self.directory, entry.file, "manifest file")
        except UnsafePathError as exc:
            raise CorruptStoreError(f"{self.directory / 'manifest.json'}: {exc}") from None

    def remove_unlisted_files(self) -> list[str]:
        """Delete shard files the manifest does not list (a shard killed in flight)."""
        listed = {self.directory / "manifest.json"}
        for shard in self.manifest.shards:
            listed.add(self.path_of(shard.routing))
            listed.update(self.path_of(entry) for entry in shard.hidden.values())
        removed = []
        for path in self.directory.iterdir():
            if path.is_file() and path not in listed and (path.name.startswith((".shard-", "shard-", ".manifest"))):
                path.unlink()
                removed.append(path.name)
        return removed

    # --- reading ----------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, *, verify_checksums: bool = False) -> TraceStore:
        """Open a store; checks that every listed file exists with the listed size (and,
        with ``verify_checksums``, its SHA-256). Errors name the offending file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CorruptStoreError(f"trace store not found: {directory}")
        store = cls(directory, Manifest.load(directory))
        store.check_files(verify_checksums=verify_checksums)
        return store

    def check_files(self, *, verify_checksums: bool = False) -> None:
        for shard in self.manifest.shards:
            for entry in (shard.routing, *shard.hidden.values()):
                path = self.path_of(entry)
                if not path.is_file():
                    raise CorruptStoreError(f"{path}: listed in the manifest but missing")
                size = path.stat().st_size
                if size != entry.bytes:
                    raise CorruptStoreError(
                        f"{path}: {size} bytes but the manifest lists {entry.bytes} (truncated or replaced)"
                    )
                if verify_checksums and sha256_of(path) != entry.sha256:
                    raise CorruptStoreError(f"{path}: SHA-256 does not match the manifest (corrupt)")

    @property
    def stacks(self) -> list[str]:
        return list(self.manifest.model.stacks)

    def default_stack(self) -> str:
        return self.stacks[0]

    def read_shard(self, index: int, stack: str | None = None) -> ShardData:
        """Read one shard's routing for ``stack`` (memory-mapped; only the needed columns)."""
        stack = stack or self.default_stack()
        if stack not in self.manifest.model.stacks:
            raise KeyError(f"no stack {stack!r} in this store; stacks: {self.stacks}")
        shard = self.manifest.shards[index]
        path = self.path_of(shard.routing)
        columns = [
            "doc_id",
            "doc_group",
            "window",
            "position",
            "token_id",
            f"{stack}.expert_ids",
            f"{stack}.gate_weights",
        ]
        try:
            table = pq.read_table(path, columns=columns, memory_map=True)
        except (pa.ArrowException, OSError) as exc:
            raise CorruptStoreError(f"{path}: cannot read shard ({exc})") from None
        if table.num_rows != shard.num_tokens:
            raise CorruptStoreError(f"{path}: {table.num_rows} rows but the manifest lists {shard.num_tokens}")
        layers = self.manifest.model.stacks[stack].num_layers
        k = self.manifest.model.top_k

        def grid(name: str, dtype) -> np.ndarray:
            values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            return values.astype(dtype, copy=False).reshape(table.num_rows, layers, k)

        return ShardData(
            doc_ids=table.column("doc_id").to_numpy(zero_copy_only=False).astype(object),
            doc_groups=table.column("doc_group").to_numpy(zero_copy_only=False).astype(object),
            windows=table.column("window").to_numpy(),
            positions=table.column("position").to_numpy(),
            token_ids=table.column("token_id").to_numpy(),
            expert_ids=grid(f"{stack}.expert_ids", np.int16),
            gate_weights=grid(f"{stack}.gate_weights", np.float32),
        )

    def iter_shards(self, stack: str | None = None) -> Iterator[ShardData]:
        """Stream shards one at a time; the whole store is never in memory."""
        for index in range(len(self.manifest.shards)):
            yield self.read_shard(index, stack)

    def hidden_states(self, index: int, kind: str = "router_input", stack: str | None = None):
        """Memory-mapped fp16 hidden states of one shard, shape (T, L, D), as a torch tensor."""
        from safetensors import safe_open

        stack = stack or self.default_stack()
        shard = self.manifest.shards[index]
        if kind not in shard.hidden:
            raise KeyError(f"this store has no {kind} states (collect with --save-router-inputs)")
        path = self.path_of(shard.hidden[kind])
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(stack)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CorruptStoreError(f"{path}: cannot read hidden states ({exc})") from None
