"""The built-in models: small MoE language models trained here on the shipped corpus.

They ship as ordinary Hugging Face checkpoints under ``specmoe/models/builtin/weights``;
``specmoe collect --model switch-128e`` resolves the name to that directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "weights"
DEFAULT_BUILTIN = "switch-128e"


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    description: str
    objective: str
    """``"span_corruption"`` (encoder-decoder) or ``"causal_lm"``."""
    vocab_size: int
    config_factory: Callable[[int], object]
    stands_in_for: str
    """The published model whose routing this small one imitates, and how it differs."""

    def build_model(self):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = self.config_factory(self.vocab_size)
        auto = AutoModelForSeq2SeqLM if self.objective == "span_corruption" else AutoModelForCausalLM
        return auto.from_config(config)

    @property
    def path(self) -> Path:
        return BUILTIN_DIR / self.name


def _switch_config(vocab_size: int):
    from transformers import SwitchTransformersConfig

    # Seed setting: top-1 of 128 experts, 6 encoder MoE layers (every other layer, as in
    # Switch-base-128), scaled down so the checkpoint stays under 40 MB.
    return SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=128,
        d_kv=32,
        d_ff=64,
        num_heads=4,
        num_layers=12,
        num_sparse_encoder_layers=6,
        num_decoder_layers=2,
        num_sparse_decoder_layers=1,
        num_experts=128,
        expert_capacity=16,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        decoder_start_token_id=0,
    )


# The sizes and token ids both decoders share (their attention follows their families: OLMoE's
# QK-norm, Mixtral's rope base).
_SMALL_DECODER = {
    "hidden_size": 128,
    "intermediate_size": 64,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": None,
    "tie_word_embeddings": False,
}


def _olmoe_config(vocab_size: int):
    from transformers import OlmoeConfig

    # Today's fine-grained style: top-8 of 64 small experts in every one of 8 layers.
    return OlmoeConfig(
        vocab_size=vocab_size,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
        **_SMALL_DECODER,
    )


def _mixtral_config(vocab_size: int):
    from transformers import MixtralConfig

    # Coarse top-2 routing in a decoder (Mixtral's 2 of 8, with more experts to choose from),
    # between switch-128e's top-1 and olmoe-64e's top-8.
    return MixtralConfig(
        vocab_size=vocab_size,
        num_local_experts=32,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.05,
        router_jitter_noise=0.0,
        **_SMALL_DECODER,
    )


BUILTIN_SPECS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec(
            "switch-128e",
            "Switch Transformers (encoder-decoder), top-1 of 128 experts, 6 encoder + 1 decoder MoE layers",
            "span_corruption",
            8192,
            _switch_config,
            "Switch-base-128 (google/switch-base-128): the same top-1 routing over 128 experts in every other "
            "encoder layer (6 MoE layers), with a 2-layer decoder instead of 12, scaled down (d_model 128, "
            "expert FFN 64) so that it trains on 2 CPU cores",
        ),
        BuiltinSpec(
            "olmoe-64e",
            "OLMoE-style decoder, top-8 of 64 experts, 8 MoE layers",
            "causal_lm",
            8192,
            _olmoe_config,
            "OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): the same top-8 of 64 fine-grained experts in every layer, "
            "in 8 layers instead of 16 and scaled down (d_model 128, expert FFN 64)",
        ),
        BuiltinSpec(
            "mixtral-32e",
            "Mixtral-style decoder, top-2 of 32 experts, 8 MoE layers",
            "causal_lm",
            8192,
            _mixtral_config,
            "Mixtral-style top-2 routing (Mixtral-8x7B routes 2 of 8 experts; this model 2 of 32), in a small "
            "decoder (8 layers, d_model 128, expert FFN 64)",
        ),
    )
}
