"""The compute of an MoE model per token, from its config alone (built on the meta device),
for setting a predictor's cost beside the model's: one MoE layer's FLOPs, and the whole
model's per decoded token.

The real models of ``configs/`` cannot be downloaded here, so their configs are written out
below, with the fields that set their shapes, as published in each checkpoint's
``config.json`` on the Hugging Face hub (every other field keeps transformers' default,
which does not change a parameter count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PUBLISHED_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "mistralai/Mixtral-8x7B-v0.1": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "allenai/OLMoE-1B-7B-0924": {
        "model_type": "olmoe",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "intermediate_size": 1024,
        "vocab_size": 50304,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "intermediate_size": 5632,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "deepseek-ai/DeepSeek-V2-Lite": {
        "model_type": "deepseek_v2",
        "hidden_size": 2048,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408,
        "intermediate_size": 10944,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "vocab_size": 102400,
        "topk_method": "greedy",
        "tie_word_embeddings": False,
    },
    "openai/gpt-oss-20b": {
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "intermediate_size": 2880,
        "vocab_size": 201088,
        "tie_word_embeddings": False,
    },
    "google/switch-base-128": {
        "model_type": "switch_transformers",
        "d_model": 768,
        "d_ff": 3072,
        "d_kv": 64,
        "num_heads": 12,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_experts": 128,
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "vocab_size": 32128,
    },
}


@dataclass(frozen=True)
class ModelCompute:
    """FLOPs (2 per multiply-add) of one decoded token, at a context of one token (attention
    over a longer context adds to the model, so these ratios are upper bounds)."""

    model_id: str
    hidden_size: int
    num_experts: int
    top_k: int
    moe_layers: int
    vocab_size: int
    moe_layer_flops: float
    """Router plus the k experts a token runs, plus any shared expert, of one MoE layer."""
    token_flops: float
    """Every weight a token multiplies once: attention, dense and shared MLPs, the router, k
    experts per MoE layer, and the unembedding (the input embedding is a lookup)."""


def model_compute(model_id: str, *, trust_remote_code: bool = False) -> ModelCompute:
    """The compute of ``model_id``: a published config above, or any config ``load_config``
    reads (a built-in model, a local checkpoint, a hub id when online)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from specmoe.models.loading import load_config, wrap_model

    if model_id in PUBLISHED_CONFIGS:
        fields = dict(PUBLISHED_CONFIGS[model_id])
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        config = load_config(model_id, trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if config.model_type == "switch_transformers" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    loaded = wrap_model(model_id, model)
    layers = loaded.layers_of(loaded.layers[0].stack)
    expert = sum(p.numel() for p in loaded.adapter.expert_parameters(layers[0], 0))
    router = loaded.adapter.router_weights(layers[0])[0].numel()
    block = sum(p.numel() for p in layers[0].block.parameters())
    shared = block - loaded.num_experts * expert - router  # shared experts, if any
    inactive = len(loaded.layers) * (loaded.num_experts - loaded.top_k) * expert
    embedding = model.get_input_embeddings().weight.numel()
    active = sum(p.numel() for p in model.parameters()) - inactive - embedding
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        active += embedding  # the tied unembedding is still a matrix product per token
    return ModelCompute(
        model_id=model_id,
        hidden_size=getattr(config, "hidden_size", None) or config.d_model,
        num_experts=loaded.num_experts,
        top_k=loaded.top_k,
        moe_layers=len(layers),
        vocab_size=config.vocab_size,
        moe_layer_flops=2.0 * (loaded.top_k * expert + router + shared),
        token_flops=2.0 * active,
    )
