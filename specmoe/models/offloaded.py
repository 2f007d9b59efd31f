"""A model for offloaded execution, loaded without its routed experts.

The model is built with no weights (parameters on the meta device, buffers real: accelerate's
``init_empty_weights``), the layout of its experts is discovered, and every parameter that is
not a routed expert is read from the checkpoint one tensor at a time, in the checkpoint's
own dtype unless another is asked for. Routed experts never enter memory here: the expert
store (:mod:`.expert_store`) reads them, one at a time, when the fast tier needs them. Peak
memory while loading: the non-expert weights and one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from specmoe.errors import InputError
from specmoe.models.checkpoint import SafetensorsCheckpoint, TensorEntry
from specmoe.models.expert_layout import ExpertLayout, discover_layout
from specmoe.models.loading import SEQ2SEQ_FAMILIES, LoadedModel, load_config, local_checkpoint, wrap_model
from specmoe.models.registry import adapter_for
from specmoe.models.weights import WeightPlan, set_tensor


@dataclass
class OffloadedModel:
    """A model whose routed experts stay in the checkpoint (or an expert store made from it)."""

    loaded: LoadedModel
    checkpoint: SafetensorsCheckpoint
    plan: WeightPlan
    layouts: list[ExpertLayout]
    dtype: torch.dtype
    recipes: list[list[list[tuple[str, torch.Tensor]]]]
    """``recipes[g][e]``: (parameter name, meta view) of each of expert e's tensors in MoE
    layer g, in the adapter's ``expert_parameters`` order."""

    def expert_tensors(self, layer: int, expert: int) -> list[torch.Tensor]:
        """Expert ``expert`` of MoE layer ``layer``, read from the checkpoint, in ``dtype``."""
        return [
            self.plan.expert_tensor(name, expert, view).to(self.dtype) for name, view in self.recipes[layer][expert]
        ]

    def expert_ranges(self, layer: int, expert: int) -> list[list[TensorEntry]] | None:
        """Per tensor of the expert, the checkpoint byte ranges it is read from, back to back;
        None if any needs converting (another dtype, or more than stacking and concatenating)."""
        ranges = []
        for name, view in self.recipes[layer][expert]:
            parts = self.plan.expert_ranges(name, expert, view)
            if parts is None or any(part.dtype != self.dtype for part in parts):
                return None
            ranges.append(parts)
        return ranges

    def expert_nbytes(self, layer: int) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(view.numel() * item for _, view in self.recipes[layer][0])

    def non_expert_nbytes(self) -> int:
        """Bytes of everything held in memory: every tensor but the routed experts."""
        tensors = self.loaded.model.state_dict(keep_vars=True).values()
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors if not t.is_meta}.values())


def load_offloaded(
    name_or_path: str, *, dtype: str | None = None, trust_remote_code: bool = False, progress: bool = True
) -> OffloadedModel:
    """Load everything of ``name_or_path`` (hub id, local directory or built-in name) but its
    routed experts; ``dtype`` (``float32``, ``bfloat16``, ``float16``) overrides the
    checkpoint's own."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    adapter_for(config.model_type)
    if getattr(config, "quantization_config", None):
        raise InputError(
            f"{name_or_path} is quantized ({config.quantization_config.get('quant_method', '?')}); the offloaded "
            "loader reads unquantized safetensors checkpoints (bf16, fp16 or fp32)"
        )
    directory = local_checkpoint(name_or_path)
    checkpoint = SafetensorsCheckpoint(directory)
    target = _dtype(dtype, config, checkpoint)
    auto = AutoModelForSeq2SeqLM if config.model_type in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=target, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from None
    loaded = wrap_model(name_or_path, model, tokenizer)
    layouts = [discover_layout(loaded.adapter, layer, loaded.num_experts) for layer in loaded.layers]
    recipes = [_recipes(loaded, layer, layout) for layer, layout in zip(loaded.layers, layouts)]
    experts = {name for layer in recipes for expert in layer for name, _ in expert}
    plan = WeightPlan(model, checkpoint)
    # parameters, and persistent buffers (their initial values are not the checkpoint's)
    wanted = [name for name in model.state_dict(keep_vars=True) if name not in experts and name in plan]
    for name in tqdm(wanted, desc=f"load {name_or_path} without its experts", unit="tensor", disable=not progress):
        tensor = plan.tensor(name)
        set_tensor(model, name, tensor.to(target) if tensor.is_floating_point() else tensor)
    model.tie_weights()  # what the checkpoint leaves out, shared with another tensor
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta and n not in experts]
    if missing:
        raise InputError(f"{directory}: the checkpoint lacks {len(missing)} of the model's tensors, e.g. {missing[:3]}")
    model.eval()
    return OffloadedModel(loaded, checkpoint, plan, layouts, target, recipes)


def _recipes(loaded: LoadedModel, layer, layout: ExpertLayout) -> list[list[tuple[str, torch.Tensor]]]:
    prefix = f"{layer.name}.{loaded.adapter.experts_attr}."
    return [
        [(prefix + name, view) for name, view in zip(layout.names[e], loaded.adapter.expert_parameters(layer, e))]
        for e in range(loaded.num_experts)
    ]


def _dtype(asked: str | None, config, checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    if asked is not None:
        if asked not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--dtype must be float32, bfloat16 or float16, got {asked!r}")
        return getattr(torch, asked)
    stored = getattr(config, "dtype", None)
    if isinstance(stored, torch.dtype) and stored.is_floating_point:
        return stored
    floats = [e.dtype for e in checkpoint.entries.values() if e.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32
