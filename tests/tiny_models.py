"""Tiny random configs, one per supported model_type, small enough for CPU tests."""

from __future__ import annotations

import torch

VOCAB = 320


def tiny_config(model_type: str):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if model_type == "switch_transformers":
        # expert_capacity 3 over 16-token sequences forces some tokens over capacity.
        return tf.SwitchTransformersConfig(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=16,
            num_heads=2,
            num_layers=4,
            num_sparse_encoder_layers=2,
            num_decoder_layers=2,
            num_sparse_decoder_layers=1,
            num_experts=8,
            expert_capacity=3,
            router_jitter_noise=0.0,
            dropout_rate=0.0,
            decoder_start_token_id=0,
        )
    if model_type == "mixtral":
        return tf.MixtralConfig(
            **common, intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2
        )
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=32,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            num_experts=8,
            num_experts_per_tok=2,
        )
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=16,
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            mlp_only_layers=[0],
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if model_type == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
    if model_type in ("deepseek_v2", "deepseek_v3"):
        cls = tf.DeepseekV2Config if model_type == "deepseek_v2" else tf.DeepseekV3Config
        extra = dict(topk_method="group_limited_greedy") if model_type == "deepseek_v2" else dict(norm_topk_prob=True)
        return cls(
            **{**common, "num_key_value_heads": 2},
            intermediate_size=32,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            **extra,
        )
    if model_type == "gpt_oss":
        return tf.GptOssConfig(
            **common,
            head_dim=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=8,
        )
    if model_type == "phimoe":
        return tf.PhimoeConfig(
            **common, intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2
        )
    if model_type == "granitemoe":
        return tf.GraniteMoeConfig(
            **common, intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2
        )
    if model_type == "jetmoe":
        return tf.JetMoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_key_value_heads=2,
            kv_channels=8,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if model_type == "dbrx":
        return tf.DbrxConfig(
            d_model=32,
            n_heads=2,
            n_layers=2,
            vocab_size=VOCAB,
            max_seq_len=128,
            attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2},
        )
    if model_type == "llama4_text":
        return tf.Llama4TextConfig(
            **common,
            head_dim=16,
            intermediate_size=16,
            intermediate_size_mlp=32,
            num_hidden_layers=2,
            num_local_experts=8,
            num_experts_per_tok=2,
            interleave_moe_layer_step=1,
        )
    raise KeyError(model_type)


TINY_MODEL_TYPES = (
    "switch_transformers",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "phimoe",
    "granitemoe",
    "jetmoe",
    "dbrx",
    "llama4_text",
)


def tiny_model(model_type: str, seed: int = 0):
    """A randomly initialised tiny model; router biases are randomised so that selection
    rules that use them (DeepSeek-V3's correction bias) matter."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    auto = AutoModelForSeq2SeqLM if model_type == "switch_transformers" else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.5)
        for param in model.parameters():
            if param.abs().sum() == 0 and param.dim() >= 2:  # some families init router weights to zero
                param.normal_(0, 0.2)
    return model


def save_tiny_checkpoint(model_type: str, directory, seed: int = 0):
    """Write a tiny model and a matching byte-level BPE tokenizer as a Hugging Face checkpoint."""
    from specmoe.models.builtin.train import train_tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 20 + "def f(x):\n    return x + 1\n" * 10
    tokenizer = train_tokenizer([text], vocab_size=VOCAB - 8)
    tiny_model(model_type, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
