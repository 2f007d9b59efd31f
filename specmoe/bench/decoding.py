"""The tokens a measured replay decodes: the test split's, in lockstep batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specmoe.errors import InputError
from specmoe.offload.simulated.simulator import NO_TOKEN
from specmoe.predictors.data import TraceDataset
from specmoe.traces.store import TraceStore


@dataclass(frozen=True)
class DecodeSteps:
    """S steps of B sequences decoded in lockstep (``NO_TOKEN`` routing where a sequence has
    ended): routing (S, B, L, k), gate weights (S, B, L, k), token ids (S, B), the window
    each token is of (S, B; -1 where none), and hidden states (S, B, L, D) by kind."""

    routing: np.ndarray
    gate_weights: np.ndarray
    token_ids: np.ndarray
    windows: np.ndarray
    states: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.routing)


def decode_steps(store: TraceStore, steps: int, batch_size: int, split_seed: int, hidden_kinds=()) -> DecodeSteps:
    """The test split's first ``steps`` steps of ``batch_size`` windows decoded together:
    windows in store order, ``batch_size`` at a time, each group's steps after the previous
    group's (with one window at a time, the tokens in order). Of a ``greedy`` store only
    the decoded tokens are taken (prompts are prefilled, not decoded)."""
    collection = store.manifest.collection
    missing = [kind for kind in hidden_kinds if kind not in collection.hidden]
    if missing:
        flag = {"residual_out": "--save-residuals", "router_input": "--save-router-inputs"}
        raise InputError(
            f"{store.directory} holds no {missing[0]} states, which next-token prefetch or a predictor "
            f"reads; collect it with {flag.get(missing[0], missing[0])}"
        )
    prompt_len = collection.seq_len - collection.generated_tokens if collection.mode == "greedy" else 0
    wanted = steps * batch_size + collection.seq_len * batch_size  # whole windows for the last group

    def take(hidden: str | None) -> list:
        parts, count = [], 0
        for batch in TraceDataset(store, "test", seed=split_seed, hidden=hidden).iter_batches(4096):
            decoded = batch.positions >= prompt_len
            if hidden is None:
                chosen = torch.from_numpy(decoded)
                parts.append(
                    (
                        batch.expert_ids[chosen].numpy(),
                        batch.gate_weights[chosen].numpy(),
                        batch.token_ids[chosen].numpy(),
                        batch.windows[decoded],
                        batch.positions[decoded],
                    )
                )
            else:
                parts.append(batch.hidden[torch.from_numpy(decoded)])
            count += int(decoded.sum())
            if count >= wanted:
                break
        return parts

    ids, weights, tokens, windows, positions = (np.concatenate(column) for column in zip(*take(None)))
    hidden = {kind: torch.cat(take(kind)) for kind in hidden_kinds}
    _, first = np.unique(windows, return_index=True)
    order = windows[np.sort(first)]  # windows in the order they come
    groups = []
    total = 0
    for start in range(0, len(order), batch_size):
        rows = [np.nonzero(windows == w)[0] for w in order[start : start + batch_size]]
        rows = [r[np.argsort(positions[r], kind="stable")] for r in rows]
        groups.append(rows)
        total += max(len(r) for r in rows)
        if total >= steps:
            break
    total = min(total, steps)
    layers, k = ids.shape[1:]
    out = DecodeSteps(
        np.full((total, batch_size, layers, k), NO_TOKEN, dtype=np.int64),
        np.zeros((total, batch_size, layers, k), dtype=np.float32),
        np.zeros((total, batch_size), dtype=np.int64),
        np.full((total, batch_size), -1, dtype=np.int64),
        {kind: torch.zeros((total, batch_size) + value.shape[1:]) for kind, value in hidden.items()},
    )
    step = 0
    for rows in groups:
        for b, r in enumerate(rows):
            r = r[: total - step]
            out.routing[step : step + len(r), b] = ids[r]
            out.gate_weights[step : step + len(r), b] = weights[r]
            out.token_ids[step : step + len(r), b] = tokens[r]
            out.windows[step : step + len(r), b] = windows[r]
            for kind, value in hidden.items():
                out.states[kind][step : step + len(r), b] = value[torch.from_numpy(r)]
        step += max(len(r) for r in rows)
        if step >= total:
            break
    return out
