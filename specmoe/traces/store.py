"""Sharded trace store: write shards atomically, read them back one at a time.

Layout of a store directory::

    manifest.json                          # schema.Manifest
    shard-00000.parquet                    # routing of windows_per_shard windows
    shard-00000.router_input.safetensors   # optional, fp16 (T, L, D) per stack
    .specmoe.verified.json                 # verified markers of the hidden-state files

Every read is checked: a routing shard's bytes against the manifest's SHA-256 each time it is
read (they are small), a hidden-state file once per change of its identity (see
:class:`~specmoe.storage.integrity.VerifiedFiles`), and decoded values against their ranges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from specmoe.errors import CorruptStoreError
from specmoe.storage import atomic
from specmoe.storage.integrity import VerifiedFiles, check_finite, check_range, read_verified, sha256_file
from specmoe.storage.paths import METADATA_PREFIX, UnsafePathError, join_inside
from specmoe.traces.schema import FileEntry, Manifest, ShardEntry

VERIFIED_MARKER = METADATA_PREFIX + ".verified.json"
REMEDY = (
    "the file changed after it was written (a disk fault or an edit): restore the store from a copy, "
    "or collect the traces again into a new --out"
)


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
        self.verified = VerifiedFiles(self.directory / VERIFIED_MARKER)

    def _commit(self, final: Path) -> FileEntry:
        """Record a file just committed by :func:`atomic.atomic_path`: its entry and its marker."""
        entry = FileEntry(file=final.name, bytes=final.stat().st_size, sha256=sha256_file(final))
        self.verified.record(final, entry.sha256, save=False)
        return entry

    # --- writing ----------------------------------------------------------------------
    def write_shard(
        self, index: int, table: pa.Table, hidden: dict[str, dict[str, np.ndarray]], first_window: int, num_windows: int
    ) -> ShardEntry:
        """Write one shard (tmp file, fsync, rename), then record it in the manifest."""
        from safetensors.numpy import save_file

        stem = f"shard-{index:05d}"
        with atomic.atomic_path(self.directory / f"{stem}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        routing = self._commit(self.directory / f"{stem}.parquet")
        hidden_entries = {}
        for kind, tensors in hidden.items():
            final = self.directory / f"{stem}.{kind}.safetensors"
            with atomic.atomic_path(final) as tmp:
                save_file({stack: np.ascontiguousarray(arr, dtype=np.float16) for stack, arr in tensors.items()}, tmp)
            hidden_entries[kind] = self._commit(final)
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
        self.verified.save()
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
        """Open a store; checks that every listed file exists with the listed size. Checksums
        are checked as files are read; ``verify_checksums`` hashes every file now, markers
        ignored. Errors name the offending file."""
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
                    raise CorruptStoreError(f"{path}: listed in the manifest but missing; {REMEDY}")
                size = path.stat().st_size
                if size != entry.bytes:
                    raise CorruptStoreError(
                        f"{path}: {size} bytes but the manifest lists {entry.bytes} (truncated or replaced); {REMEDY}"
                    )
                if verify_checksums:
                    self.verified.verify(path, entry.sha256, remedy=REMEDY, error=CorruptStoreError, force=True)

    @property
    def stacks(self) -> list[str]:
        return list(self.manifest.model.stacks)

    def default_stack(self) -> str:
        return self.stacks[0]

    def read_shard(self, index: int, stack: str | None = None) -> ShardData:
        """Read one shard's routing for ``stack`` (only the needed columns), checked."""
        stack = stack or self.default_stack()
        if stack not in self.manifest.model.stacks:
            raise KeyError(f"no stack {stack!r} in this store; stacks: {self.stacks}")
        columns = [
            "doc_id",
            "doc_group",
            "window",
            "position",
            "token_id",
            f"{stack}.expert_ids",
            f"{stack}.gate_weights",
        ]
        table = self.routing_columns(index, columns)
        path = self.path_of(self.manifest.shards[index].routing)
        layers = self.manifest.model.stacks[stack].num_layers
        k = self.manifest.model.top_k

        def grid(name: str, dtype) -> np.ndarray:
            values = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if values.size != table.num_rows * layers * k:
                raise CorruptStoreError(
                    f"{path}: column {name} does not hold {layers} x {k} values per token; {REMEDY}"
                )
            return values.astype(dtype, copy=False).reshape(table.num_rows, layers, k)

        data = ShardData(
            doc_ids=table.column("doc_id").to_numpy(zero_copy_only=False).astype(object),
            doc_groups=table.column("doc_group").to_numpy(zero_copy_only=False).astype(object),
            windows=table.column("window").to_numpy(),
            positions=table.column("position").to_numpy(),
            token_ids=table.column("token_id").to_numpy(),
            expert_ids=grid(f"{stack}.expert_ids", np.int16),
            gate_weights=grid(f"{stack}.gate_weights", np.float32),
        )
        self._check_values(data, path)
        return data

    def routing_columns(self, index: int, columns: list[str] | None) -> pa.Table:
        """Some columns (None: all) of shard ``index``, decoded from bytes checked against the manifest."""
        shard = self.manifest.shards[index]
        path = self.path_of(shard.routing)
        data = read_verified(
            path, shard.routing.sha256, size=shard.routing.bytes, remedy=REMEDY, error=CorruptStoreError
        )
        try:
            table = pq.read_table(pa.BufferReader(data), columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise CorruptStoreError(f"{path}: cannot read shard ({exc}); {REMEDY}") from None
        if table.num_rows != shard.num_tokens:
            raise CorruptStoreError(f"{path}: {table.num_rows} rows but the manifest lists {shard.num_tokens}")
        return table

    def _check_values(self, data: ShardData, path: Path) -> None:
        """Decoded values in their ranges: what a checksum written by a faulty collector, or a
        store assembled by hand, would not catch."""
        m = self.manifest
        ranges = (
            (data.expert_ids, -1, m.model.num_experts, "expert id"),
            (data.token_ids, 0, np.iinfo(np.int32).max, "token id"),  # greedy ids may pass len(tokenizer)
            (data.positions, 0, m.collection.seq_len, "position"),
            (data.windows, 0, np.iinfo(np.int64).max, "window index"),
        )
        for values, low, high, what in ranges:
            check_range(values, low, high, what=what, path=path, remedy=REMEDY, error=CorruptStoreError)
        check_finite(data.gate_weights, what="gate weights", path=path, remedy=REMEDY, error=CorruptStoreError)

    def iter_shards(self, stack: str | None = None) -> Iterator[ShardData]:
        """Stream shards one at a time; the whole store is never in memory."""
        for index in range(len(self.manifest.shards)):
            yield self.read_shard(index, stack)

    def hidden_arrays(self, index: int, kind: str) -> dict[str, np.ndarray]:
        """Every stack's hidden states of one shard, as numpy, decoded from checked bytes."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        entry = self.manifest.shards[index].hidden[kind]
        path = self.path_of(entry)
        data = read_verified(path, entry.sha256, size=entry.bytes, remedy=REMEDY, error=CorruptStoreError)
        try:
            return load(data)
        except (SafetensorError, ValueError) as exc:
            raise CorruptStoreError(f"{path}: cannot read hidden states ({exc}); {REMEDY}") from None

    def hidden_states(self, index: int, kind: str = "router_input", stack: str | None = None):
        """Memory-mapped fp16 hidden states of one shard, shape (T, L, D), as a torch tensor."""
        from safetensors import safe_open

        stack = stack or self.default_stack()
        shard = self.manifest.shards[index]
        if kind not in shard.hidden:
            raise KeyError(f"this store has no {kind} states (collect with --save-router-inputs)")
        entry = shard.hidden[kind]
        path = self.path_of(entry)
        self.verified.verify(path, entry.sha256, remedy=REMEDY, error=CorruptStoreError)
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(stack)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CorruptStoreError(f"{path}: cannot read hidden states ({exc}); {REMEDY}") from None
        expected = (shard.num_tokens, self.manifest.model.stacks[stack].num_layers)
        if tensor.dim() != 3 or tuple(tensor.shape[:2]) != expected:
            raise CorruptStoreError(
                f"{path}: hidden states of shape {tuple(tensor.shape)}, expected {expected} x hidden size; {REMEDY}"
            )
        return tensor
