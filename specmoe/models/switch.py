"""Switch Transformers: top-1 routing with per-sequence expert capacity, in both stacks.

The experts receive a one-hot dispatch mask from which over-capacity tokens were removed;
such a dropped token is recorded as expert ``-1`` with weight 0 (it skips the MoE layer).
"""

import torch

from specmoe.models.base import MoEAdapter, MoELayer, Selection


class SwitchAdapter(MoEAdapter):
    family = "switch_transformers"
    model_types = ("switch_transformers",)
    block_classes = ("SwitchTransformersSparseMLP",)
    num_experts_keys = ("num_experts",)

    def top_k(self, config) -> int:
        return 1

    def stacks(self, config) -> tuple[str, ...]:
        return ("encoder", "decoder")

    def stack_of(self, module_name: str) -> str:
        return "encoder" if module_name.startswith("encoder.") or ".encoder." in module_name else "decoder"

    def selection_from_call(self, layer: MoELayer, args: tuple, kwargs: dict) -> Selection:
        dispatch = kwargs.get("selected_experts", args[1] if len(args) > 1 else None)  # (N, 1, E)
        weights = kwargs.get("routing_weights", args[2] if len(args) > 2 else None)  # (N, 1)
        dispatch = dispatch.reshape(dispatch.shape[0], -1)
        kept = dispatch.sum(-1) > 0
        ids = torch.where(kept, dispatch.argmax(-1), torch.full_like(kept, -1, dtype=torch.long))
        weights = torch.where(kept, weights.reshape(-1).float(), torch.zeros((), dtype=torch.float32))
        return ids[:, None], weights[:, None]

    norm_attrs = ("layer_norm",)

    def expert_parameters(self, layer: MoELayer, expert_idx: int):
        return list(layer.block.experts[f"expert_{expert_idx}"].parameters())

    def forward(self, model, input_ids, attention_mask):
        # The decoder is teacher-forced on the same text (shifted right), so both stacks
        # route the same tokens; the decoder's row t holds input token t-1.
        decoder_input_ids = model._shift_right(input_ids)
        return model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False
        )
