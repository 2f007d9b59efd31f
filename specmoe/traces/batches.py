"""Run a model over a shard's windows, batch by batch, and write the routing as one shard."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from specmoe.models.loading import LoadedModel
from specmoe.models.placement import input_device
from specmoe.traces.greedy import continue_greedily
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.store import TraceStore, routing_table

if TYPE_CHECKING:
    from specmoe.traces.collector import CollectConfig
    from specmoe.traces.windows import Window


def batch_tensors(windows: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, both (B, S)."""
    width = max(len(w.token_ids) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, window in enumerate(windows):
        input_ids[row, : len(window.token_ids)] = torch.tensor(window.token_ids)
        mask[row, : len(window.token_ids)] = 1
    return input_ids, mask


def run_batch(loaded: LoadedModel, recorder: RoutingRecorder, windows: list[Window], pad_id: int):
    """One forward pass; returns the layer records and the (B*S,) mask of real tokens."""
    input_ids, mask = batch_tensors(windows, pad_id)
    device = input_device(loaded.model)
    with torch.no_grad():
        loaded.adapter.forward(loaded.model, input_ids.to(device), mask.to(device))
    records = recorder.pop()
    keep = mask.reshape(-1).bool()
    expected = input_ids.numel()
    for key, record in records.items():
        if record.expert_ids.shape[0] != expected:
            raise RuntimeError(
                f"layer {key} recorded {record.expert_ids.shape[0]} tokens for a batch of "
                f"{expected}; the adapter does not match this model's forward pass"
            )
    return records, keep


def run_greedy_batch(loaded: LoadedModel, recorder: RoutingRecorder, windows: list[Window], new_tokens: int):
    """Like :func:`run_batch` for decode mode: the windows (equal-length prompts) grow by the
    tokens the model chose, and every fed token is recorded."""
    prompts = torch.tensor([w.token_ids for w in windows])
    sequences, records = continue_greedily(loaded, recorder, prompts, new_tokens)
    for window, row in zip(windows, sequences.tolist()):
        window.token_ids = row
    return records, torch.ones(sequences.numel(), dtype=torch.bool)


class ShardBuffer:
    """Accumulates one shard's rows batch by batch, then lays them out as (T, L, k) per stack."""

    def __init__(self, stacks: dict[str, int], hidden_kinds: list[str]):
        self.stacks = stacks
        self.hidden_kinds = hidden_kinds
        self.columns: dict[str, list] = {"doc_id": [], "doc_group": [], "window": [], "position": [], "token_id": []}
        self.layers: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))

    def add(self, batch: list[Window], records: dict, keep: torch.Tensor) -> None:
        for window in batch:
            n = len(window.token_ids)
            self.columns["doc_id"] += [window.doc_id] * n
            self.columns["doc_group"] += [window.doc_group] * n
            self.columns["window"] += [window.index] * n
            self.columns["position"] += range(n)
            self.columns["token_id"] += window.token_ids
        for key, record in records.items():
            slot = self.layers[key]
            slot["expert_ids"].append(record.expert_ids[keep])
            slot["gate_weights"].append(record.gate_weights[keep])
            for kind in self.hidden_kinds:
                slot[kind].append(getattr(record, kind)[keep].half())

    def _grid(self, stack: str, field: str) -> np.ndarray:
        per_layer = [torch.cat(self.layers[(stack, i)][field]) for i in range(self.stacks[stack])]
        return torch.stack(per_layer, dim=1).numpy()  # (T, L, ...)

    def finish(self):
        routing = {stack: (self._grid(stack, "expert_ids"), self._grid(stack, "gate_weights")) for stack in self.stacks}
        hidden = {kind: {stack: self._grid(stack, kind) for stack in self.stacks} for kind in self.hidden_kinds}
        columns = {name: np.asarray(values) for name, values in self.columns.items()}
        return routing_table(columns, routing), hidden


def write_shards(
    cfg: CollectConfig,
    loaded: LoadedModel,
    shards: Iterable[tuple[int, list[Window]]],
    store: TraceStore,
    *,
    desc: str,
    total: int | None,
    show: bool = True,
) -> None:
    """Run the model over each ``(index, windows)`` shard and write it to ``store``."""
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bar = tqdm(
        total=total,
        initial=store.manifest.num_tokens,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not (cfg.progress and show),
    )
    with RoutingRecorder(loaded, router_inputs=cfg.save_router_inputs, residuals=cfg.save_residuals) as recorder:
        for index, shard_windows in shards:
            buffer = ShardBuffer(loaded.stacks, cfg.hidden_kinds)
            for first in range(0, len(shard_windows), cfg.batch_size):
                batch = shard_windows[first : first + cfg.batch_size]
                if cfg.generate:
                    records, keep = run_greedy_batch(loaded, recorder, batch, cfg.generate)
                else:
                    records, keep = run_batch(loaded, recorder, batch, pad_id)
                buffer.add(batch, records, keep)
                bar.update(int(keep.sum()))
            table, hidden = buffer.finish()
            store.write_shard(index, table, hidden, shard_windows[0].index, len(shard_windows))
    bar.close()
