"""The adapter contract: where a family's MoE blocks are and what their routers selected.

An adapter never patches transformers: it finds the model's own MoE block instances and
registers ordinary forward hooks on them, removed again when recording ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# (ids, weights), both (N, k): what one MoE layer's experts received for N tokens.
Selection = tuple[torch.Tensor, torch.Tensor]


@dataclass
class MoELayer:
    """One MoE layer of a loaded model.

    Attributes:
        stack: ``"decoder"`` for decoder-only models; ``"encoder"`` or ``"decoder"`` for
            encoder-decoder models (each stack counts its own ``layer_idx``).
        layer_idx: index among the stack's MoE layers only, in execution order.
        name: qualified module name of the MoE block, e.g. ``model.layers.3.mlp``.
        block: the MoE block (router + experts).
        residual_parent: the module whose output is the residual stream leaving this block.
    """

    stack: str
    layer_idx: int
    name: str
    block: nn.Module
    residual_parent: nn.Module


def sort_by_weight(ids: torch.Tensor, weights: torch.Tensor) -> Selection:
    """Order each token's experts by gate weight, descending (some routers return them
    unsorted, e.g. DeepSeek's ``topk(sorted=False)``)."""
    weights = weights.float()
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return ids.long().gather(-1, order), weights.gather(-1, order)


class MoEAdapter:
    """Base adapter for the common layout of transformers 5.x MoE blocks: a block whose
    ``experts`` submodule is called as ``experts(hidden_states, top_k_index, top_k_weights)``.

    Subclasses name the ``model_types`` they serve, the block class names, and how to read
    ``num_experts`` / ``top_k`` from the config; families that route differently override
    :meth:`capture_hook`.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    block_classes: tuple[str, ...] = ()
    num_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    experts_attr: str = "experts"
    offload_unsupported: str | None = None
    """Why the offload runtime cannot run this family's experts, if it cannot."""
    experts_skip_padding_id: bool = True
    """The experts module skips expert id ``num_experts`` (a padding id), so the offload
    runtime can run it on one expert at a time; False where it refuses that id."""

    # --- config -----------------------------------------------------------------------
    def text_config(self, config):
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def _config_value(self, config, keys: tuple[str, ...]) -> int:
        config = self.text_config(config)
        for key in keys:
            value = getattr(config, key, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{self.family}: config has none of {keys}")

    def num_experts(self, config) -> int:
        return self._config_value(config, self.num_experts_keys)

    def top_k(self, config) -> int:
        return self._config_value(config, self.top_k_keys)

    def stacks(self, config) -> tuple[str, ...]:
        return ("decoder",)

    # --- structure --------------------------------------------------------------------
    def stack_of(self, module_name: str) -> str:
        return "decoder"

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """All MoE blocks in execution order (module registration order, which is layer
        order in every supported family), each with its residual parent."""
        modules = dict(model.named_modules())
        layers: list[MoELayer] = []
        counts: dict[str, int] = {}
        for name, module in modules.items():
            if type(module).__name__ not in self.block_classes:
                continue
            stack = self.stack_of(name)
            parent = modules[name.rsplit(".", 1)[0]] if "." in name else model
            layers.append(MoELayer(stack, counts.get(stack, 0), name, module, parent))
            counts[stack] = counts.get(stack, 0) + 1
        if not layers:
            raise ValueError(f"{self.family}: no MoE block of class {self.block_classes} found in the model")
        return layers

    # --- capture ----------------------------------------------------------------------
    def selection_from_call(self, layer: MoELayer, args: tuple, kwargs: dict) -> Selection:
        """Read (ids, weights) from the arguments of the experts call."""
        ids = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        weights = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
        return ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1])

    def capture_hook(self, layer: MoELayer, sink: Callable[[Selection], None]):
        """Register a hook that passes each call's selection to ``sink``; returns the handle."""
        experts = getattr(layer.block, self.experts_attr)

        def hook(_module, args, kwargs):
            sink(sort_by_weight(*self.selection_from_call(layer, args, kwargs)))

        return experts.register_forward_pre_hook(hook, with_kwargs=True)

    def expert_parameters(self, layer: MoELayer, expert_idx: int) -> list[torch.Tensor]:
        """Views of the parameter slices that belong to one expert (what an offloading
        runtime moves; zeroing them silences the expert)."""
        experts = getattr(layer.block, self.experts_attr)
        count = int(experts.num_experts)
        return [p[expert_idx] for p in experts.parameters() if p.dim() >= 2 and p.shape[0] == count]

    # --- router access (for training-free lookahead) ---------------------------------
    router_attrs: tuple[str, ...] = ("gate", "router", "router.layer", "router.classifier")
    norm_attrs: tuple[str, ...] = ("post_attention_layernorm", "ffn_norm", "norm_2")

    def router_weights(self, layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router's linear map: weight (E, D) and bias (E,) or None."""
        for path in self.router_attrs:
            module = layer.block
            for part in path.split("."):
                module = getattr(module, part, None)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return weight.detach(), getattr(module, "bias", None)
        raise ValueError(f"{self.family}: cannot find the router of {layer.name}")

    def pre_router_norm(self, layer: MoELayer) -> nn.Module:
        """The normalisation applied to the residual stream just before this block."""
        for attr in self.norm_attrs:
            norm = getattr(layer.residual_parent, attr, None)
            if isinstance(norm, nn.Module):
                return norm
        raise ValueError(f"{self.family}: cannot find the norm in front of {layer.name}")

    # --- running ----------------------------------------------------------------------
    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
