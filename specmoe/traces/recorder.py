"""Record routing while a model runs: hooks on the model's own MoE modules, removed on exit."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from specmoe.models.loading import LoadedModel

LayerKey = tuple[str, int]  # (stack, layer_idx)


@dataclass
class LayerRecord:
    """What one MoE layer saw for N tokens (flattened batch x sequence)."""

    expert_ids: torch.Tensor  # (N, k) int64, -1 = dropped
    gate_weights: torch.Tensor  # (N, k) float32
    router_input: torch.Tensor | None = None  # (N, D)
    residual_out: torch.Tensor | None = None  # (N, D)


class RoutingRecorder:
    """Context manager that records every MoE layer's selection during forward passes.

    >>> with RoutingRecorder(loaded, router_inputs=True) as rec:
    ...     loaded.adapter.forward(loaded.model, ids, mask)
    ...     records = rec.pop()   # {(stack, layer_idx): LayerRecord}
    """

    def __init__(self, loaded: LoadedModel, *, router_inputs: bool = False, residuals: bool = False):
        self.loaded = loaded
        self.router_inputs = router_inputs
        self.residuals = residuals
        self._handles: list = []
        self._parts: dict[LayerKey, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))

    def _append(self, key: LayerKey, field: str, tensor: torch.Tensor) -> None:
        self._parts[key][field].append(tensor.detach().reshape(-1, tensor.shape[-1]).cpu())

    def __enter__(self) -> RoutingRecorder:
        adapter = self.loaded.adapter
        for layer in self.loaded.layers:
            key = (layer.stack, layer.layer_idx)

            def on_selection(selection, key=key):
                self._append(key, "expert_ids", selection[0])
                self._append(key, "gate_weights", selection[1])

            self._handles.append(adapter.capture_hook(layer, on_selection))
            if self.router_inputs:
                self._handles.append(
                    layer.block.register_forward_pre_hook(
                        lambda _m, args, key=key: self._append(key, "router_input", args[0])
                    )
                )
            if self.residuals:
                self._handles.append(
                    layer.residual_parent.register_forward_hook(
                        lambda _m, _a, out, key=key: self._append(
                            key, "residual_out", out[0] if isinstance(out, tuple) else out
                        )
                    )
                )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> dict[LayerKey, LayerRecord]:
        """Concatenate and clear everything recorded since the last call."""
        records = {}
        for key, parts in self._parts.items():
            cat = {name: torch.cat(chunks) for name, chunks in parts.items()}
            records[key] = LayerRecord(
                cat["expert_ids"], cat["gate_weights"], cat.get("router_input"), cat.get("residual_out")
            )
        self._parts.clear()
        return records
