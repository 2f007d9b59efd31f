"""Summary statistics of a trace store (``specmoe traces info``), computed shard by shard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from specmoe.traces.store import TraceStore


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _mutual_information_bits(joint: np.ndarray) -> float:
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (px @ py)[nz])).sum())


def stack_statistics(store: TraceStore, stack: str) -> dict:
    """Per-layer expert usage and how much layer l's top-1 tells about layer l+1's top-1.

    ``next_layer_top1_acc`` is the in-sample accuracy of the best lookup table from layer
    l's top-1 to layer l+1's top-1; ``next_layer_popularity_acc`` is that of always
    guessing layer l+1's most used expert, and ``chance`` is 1 / num_experts.
    """
    num_experts = store.manifest.model.num_experts
    layers = store.manifest.model.stacks[stack].num_layers
    usage = np.zeros((layers, num_experts), dtype=np.int64)
    drops = np.zeros(layers, dtype=np.int64)
    transitions = np.zeros((max(layers - 1, 0), num_experts, num_experts), dtype=np.int64)
    tokens = 0
    for shard in store.iter_shards(stack):
        ids = shard.expert_ids.astype(np.int64)  # (T, L, k)
        tokens += len(shard)
        for layer in range(layers):
            chosen = ids[:, layer, :]
            usage[layer] += np.bincount(chosen[chosen >= 0], minlength=num_experts)
            drops[layer] += int((chosen[:, 0] < 0).sum())
        for layer in range(layers - 1):
            src, dst = ids[:, layer, 0], ids[:, layer + 1, 0]
            ok = (src >= 0) & (dst >= 0)
            np.add.at(transitions[layer], (src[ok], dst[ok]), 1)
    rows = []
    for layer in range(layers):
        row = {
            "layer": layer,
            "usage_entropy_bits": round(_entropy_bits(usage[layer]), 4),
            "usage_entropy_normalized": round(_entropy_bits(usage[layer]) / np.log2(num_experts), 4)
            if num_experts > 1
            else 1.0,
            "most_used_expert": int(usage[layer].argmax()),
            "most_used_share": round(float(usage[layer].max() / max(usage[layer].sum(), 1)), 4),
            "experts_never_used": int((usage[layer] == 0).sum()),
            "drop_rate": round(float(drops[layer] / max(tokens, 1)), 4),
        }
        if layer < layers - 1:
            joint = transitions[layer]
            total = max(int(joint.sum()), 1)
            row["next_layer_mi_bits"] = round(_mutual_information_bits(joint), 4)
            row["next_layer_top1_acc"] = round(float(joint.max(1).sum() / total), 4)
            row["next_layer_popularity_acc"] = round(float(joint.sum(0).max() / total), 4)
        rows.append(row)
    return {"num_layers": layers, "num_tokens": tokens, "layers": rows, "usage_counts": usage.tolist()}


def store_summary(store: TraceStore, *, with_statistics: bool = True) -> dict:
    m = store.manifest
    doc_ids: set[str] = set()
    for index in range(len(m.shards)):
        column = store.routing_columns(index, ["doc_id"]).column("doc_id")
        doc_ids.update(pc.unique(column.cast(pa.string())).to_pylist())
    first = store.default_stack()
    summary = {
        "path": str(store.directory),
        "model": m.model.id,
        "model_type": m.model.model_type,
        "num_layers": m.model.stacks[first].num_layers,
        "num_experts": m.model.num_experts,
        "top_k": m.model.top_k,
        "num_tokens": m.num_tokens,
        "num_documents": len(doc_ids),
        "num_shards": len(m.shards),
        "complete": m.complete,
        "hidden_states": m.collection.hidden,
        "stacks": {name: info.num_layers for name, info in m.model.stacks.items()},
        "seq_len": m.collection.seq_len,
        "texts": m.collection.texts,
        "tokenizer": m.tokenizer.name_or_path,
        "specmoe_version": m.specmoe_version,
        "chance_top1": round(1 / m.model.num_experts, 6),
    }
    if with_statistics:
        summary["statistics"] = {stack: stack_statistics(store, stack) for stack in store.stacks}
    return summary
