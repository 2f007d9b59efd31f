"""A checkpoint of a real model's shape with random weights, written without ever holding
the model: the stand-in for a model larger than memory that no package ships.

A shape is a family (its transformers default config) or a real model's name from
:data:`SHAPES`; any field can be overridden. The
skeleton is built on the meta device, and the tensors are drawn one decoder layer at a time,
converted back to the checkpoint layout transformers saves (one tensor per expert where the
family stores them so) and written as one safetensors shard per layer with an index, as
``save_pretrained`` would.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from specmoe.errors import InputError
from specmoe.models.loading import SEQ2SEQ_FAMILIES, resolve_model_path

SHAPES = {
    "olmoe-1b-7b": ("olmoe", {"intermediate_size": 1024}),
    "mixtral-8x7b": ("mixtral", {}),
    "qwen3-30b-a3b": ("qwen3_moe", {"num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4}),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", {}),
    "deepseek-v2-lite": ("deepseek_v2", {"hidden_size": 2048, "num_hidden_layers": 27, "moe_intermediate_size": 1408,
                                          "n_routed_experts": 64, "num_experts_per_tok": 6, "kv_lora_rank": 512,
                                          "q_lora_rank": None, "first_k_dense_replace": 1}),
}
"""Real models' shapes (their configs on the hub), by name, as (family, fields over its default)."""


def write_random_checkpoint(
    model_type: str,
    out: Path,
    *,
    overrides: dict | None = None,
    dtype: str = "bfloat16",
    tokenizer_from: str = "olmoe-64e",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the checkpoint to ``out`` (a new directory); returns it."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.core_model_loading import revert_weight_conversion

    from specmoe.models.registry import adapter_for

    if model_type in SHAPES:
        model_type, shape = SHAPES[model_type]
        overrides = {**shape, **(overrides or {})}
    adapter_for(model_type)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose another --out")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from))
    special = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
    try:
        config = AutoConfig.for_model(model_type, **{**special, **(overrides or {})})
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot make a {model_type} config with {overrides}: {exc}") from None
    if len(tokenizer) > config.vocab_size:
        raise InputError(f"the {tokenizer_from} tokenizer has {len(tokenizer)} tokens, more than vocab_size")
    auto = AutoModelForSeq2SeqLM if model_type in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config)
    tensors = model.state_dict(keep_vars=True)
    groups: dict[str, list[str]] = {}
    for name in tensors:  # one shard per decoder layer, the rest in one
        match = re.search(r"^(.*?layers?\.\d+)\.", name) or re.search(r"^(.*?block\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else "other", []).append(name)
    generator = torch.Generator().manual_seed(seed)
    target = getattr(torch, dtype)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for index, (group, names) in enumerate(tqdm(groups.items(), desc=f"random {model_type}", disable=not progress)):
        drawn = {name: _draw(name, tensors[name], target, generator) for name in names}
        saved = revert_weight_conversion(model, drawn)
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in saved.items()}, out / shard, metadata={"format": "pt"})
        weight_map.update({key: shard for key in saved})
        total += sum(t.numel() * t.element_size() for t in saved.values())
        del drawn, saved
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.dtype = target
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _draw(name: str, meta: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Biases 0, norm weights 1, matrices small and random (what an initialised model holds)."""
    if not meta.is_floating_point() or name.endswith("bias"):
        return torch.zeros(meta.shape, dtype=dtype if meta.is_floating_point() else meta.dtype)
    if meta.dim() == 1:
        return torch.ones(meta.shape, dtype=dtype)
    fan_in = meta.shape[-1]
    return (torch.randn(meta.shape, generator=generator) * fan_in**-0.5).to(dtype)
