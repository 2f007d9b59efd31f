"""``specmoe traces merge``: one store from stores of the same model and settings.

Stores collected apart (on different machines, each over its own texts) become one, rows in
input order: each store's windows are renumbered after the previous one's, so the result
reads like one collection over the texts in turn. The inputs must be complete and intact,
come from the same weights with the same settings, and share no document: a document in two
stores would count twice and could land on both sides of a train/test split. Like
``collect``, an interrupted merge resumes on the same command.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.compute as pc

import specmoe
from specmoe.errors import InputError
from specmoe.storage.locks import DirectoryLock
from specmoe.traces.collector import open_or_create
from specmoe.traces.schema import Manifest, MergedStore
from specmoe.traces.store import TraceStore


def merge_settings(manifest: Manifest) -> dict:
    """What must agree between merged stores: everything that shapes the data except the
    texts and how much of them was read."""
    model, collection = manifest.model, manifest.collection
    return {
        "format version": manifest.format_version,
        "model revision": model.revision,
        "model type": model.model_type,
        "MoE blocks": {stack: info.block_names for stack, info in model.stacks.items()},
        "experts": model.num_experts,
        "top-k": model.top_k,
        "dtype": model.dtype,
        "tokenizer vocabulary": manifest.tokenizer.vocab_size,
        "BOS token": manifest.tokenizer.bos_token_id,
        "seq_len": collection.seq_len,
        "batch_size": collection.batch_size,
        "windows_per_shard": collection.windows_per_shard,
        "hidden states": collection.hidden,
        "mode": collection.mode,
        "generated tokens": collection.generated_tokens,
    }


def _check_compatible(stores: list[TraceStore]) -> None:
    first = stores[0]
    expected = merge_settings(first.manifest)
    for store in stores:
        if not store.manifest.complete:
            raise InputError(f"{store.directory} is not complete; finish its `specmoe collect` before merging it")
        if store.manifest.model.revision is None:
            raise InputError(
                f"{store.directory} does not record its model revision (written by an older specmoe), so it "
                "cannot be shown to come from the same weights; collect it again to merge it"
            )
        for key, value in merge_settings(store.manifest).items():
            if value != expected[key]:
                raise InputError(
                    f"cannot merge {store.directory} with {first.directory}: {key} differs ({value} vs "
                    f"{expected[key]}); merge only stores collected with the same model and settings"
                )


def _documents(store: TraceStore) -> set[str]:
    docs: set[str] = set()
    for index in range(len(store.manifest.shards)):
        column = store.routing_columns(index, ["doc_id"]).column("doc_id")
        docs.update(pc.unique(column.cast("string")).to_pylist())
    return docs


def _check_disjoint(stores: list[TraceStore]) -> None:
    seen: dict[str, Path] = {}
    for store in stores:
        for doc in _documents(store):
            if doc in seen:
                raise InputError(
                    f"{store.directory} and {seen[doc]} both hold document {doc!r}: merged, its tokens would count "
                    "twice; merge stores collected over different texts"
                )
            seen[doc] = store.directory


def _window_count(store: TraceStore) -> int:
    """One past the largest window index (windows rise with the shards)."""
    windows = store.routing_columns(len(store.manifest.shards) - 1, ["window"]).column("window")
    return int(pc.max(windows).as_py()) + 1


def _merged_manifest(stores: list[TraceStore]) -> Manifest:
    merged = stores[0].manifest.model_copy(deep=True)
    merged.specmoe_version = specmoe.__version__
    merged.shards, merged.num_tokens, merged.complete = [], 0, False
    sources, offset = [], 0
    for store in stores:
        collection = store.manifest.collection
        sources.append(
            MergedStore(
                fingerprint=collection.fingerprint,
                texts=collection.texts,
                max_tokens=collection.max_tokens,
                num_tokens=store.manifest.num_tokens,
                window_offset=offset,
            )
        )
        offset += _window_count(store)
    merged.collection.texts = [text for store in stores for text in store.manifest.collection.texts]
    merged.collection.max_tokens = None
    merged.collection.merged_from = sources
    identity = {"merge": [source.fingerprint for source in sources], "settings": merge_settings(merged)}
    merged.collection.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return merged


def merge_stores(inputs: list[str | Path], out: str | Path) -> TraceStore:
    """Write the merge of ``inputs`` (in order) to ``out``; every input file's checksum is verified."""
    if len(inputs) < 2:
        raise InputError("give at least two stores to merge")
    out = Path(out)
    if any(Path(path).resolve() == out.resolve() for path in inputs):
        raise InputError(f"--out {out} is one of the stores to merge; write the merge to a new directory")
    stores = [TraceStore.open(path, verify_checksums=True) for path in inputs]
    _check_compatible(stores)
    _check_disjoint(stores)
    fresh = _merged_manifest(stores)
    with DirectoryLock(out, "specmoe traces merge"):
        target = open_or_create(out, fresh)
        if target.manifest.complete:
            return target
        index = 0
        for store, source in zip(stores, fresh.collection.merged_from):
            for shard_index, _ in enumerate(store.manifest.shards):
                if index >= len(target.manifest.shards):
                    _copy_shard(store, shard_index, target, index, source.window_offset)
                index += 1
        target.manifest.complete = True
        target.manifest.save(out)
    return target


def _copy_shard(store: TraceStore, shard_index: int, target: TraceStore, index: int, window_offset: int) -> None:
    shard = store.manifest.shards[shard_index]
    table = store.routing_columns(shard_index, None)
    column = table.schema.get_field_index("window")
    table = table.set_column(column, "window", pc.add(table.column("window"), window_offset))
    hidden = {kind: store.hidden_arrays(shard_index, kind) for kind in shard.hidden}
    target.write_shard(index, table, hidden, shard.first_window + window_offset, shard.num_windows)
