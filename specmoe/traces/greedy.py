"""Record routing while a decoder-only model continues prompts greedily, one token at a time.

Prefill traces route the text's own next token; a decoding model routes the token it chose
itself. Where that difference matters (guessing the next token from a late layer, replaying
a decode), the trace must come from decoding: here the prompt is prefilled once and every
continuation token is fed back through the KV cache, exactly as a server runs, and the
routing of every forward pass is kept, in sequence order.
"""

from __future__ import annotations

import inspect

import torch

from specmoe.errors import InputError
from specmoe.models.loading import LoadedModel
from specmoe.models.placement import input_device
from specmoe.traces.recorder import LayerRecord, RoutingRecorder


def check_can_generate(loaded: LoadedModel) -> None:
    if len(loaded.stacks) != 1 or getattr(loaded.model.config, "is_encoder_decoder", False):
        raise InputError(
            f"--generate needs a decoder-only (causal LM) model; {loaded.model_id} has stacks "
            f"{sorted(loaded.stacks)}. Collect its prefill traces without --generate."
        )


def continue_greedily(loaded: LoadedModel, recorder: RoutingRecorder, prompts: torch.Tensor, new_tokens: int):
    """Feed ``prompts`` (B, P) and then ``new_tokens`` greedy choices, each as its own step.

    Returns the fed sequences (B, P + new_tokens) and per layer the routing of every fed token,
    flattened batch-major like a prefill of the same sequences. The last choice is computed
    but not fed, so every returned token has its routing."""
    batch, prompt_len = prompts.shape
    device = input_device(loaded.model)
    recorder.pop()  # nothing from earlier passes may be taken for this batch's
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns, then goes).
    cache_arg = "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    fed = [prompts]
    with torch.no_grad():
        out = loaded.model(input_ids=prompts.to(device), use_cache=True)
        for _ in range(new_tokens):
            choice = out.logits[:, -1].argmax(-1, keepdim=True)
            fed.append(choice.cpu())
            cache = out.get("cache", None)
            cache = out.get("past_key_values", None) if cache is None else cache
            out = loaded.model(input_ids=choice, use_cache=True, **{cache_arg: cache})
    steps = recorder.pop()
    records = {key: _sequence_order(record, batch, prompt_len, new_tokens) for key, record in steps.items()}
    return torch.cat(fed, 1)[:, : prompt_len + new_tokens], records


def _sequence_order(record: LayerRecord, batch: int, prompt_len: int, new_tokens: int) -> LayerRecord:
    """Rows arrive as the prefill (B*P) then one (B) block per step; put them (B, P + n)."""
    expected = batch * (prompt_len + new_tokens)

    def reorder(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if tensor.shape[0] != expected:
            raise RuntimeError(f"recorded {tensor.shape[0]} rows for {expected} fed tokens; the hooks missed a step")
        prefill = tensor[: batch * prompt_len].reshape(batch, prompt_len, -1)
        steps = tensor[batch * prompt_len :].reshape(new_tokens, batch, -1).transpose(0, 1)
        return torch.cat([prefill, steps], 1).reshape(expected, -1)

    return LayerRecord(
        *(reorder(getattr(record, f)) for f in ("expert_ids", "gate_weights", "router_input", "residual_out"))
    )
