"""Decode-mode collection: the model's own greedy continuation, fed back one step at a time."""

import numpy as np
import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.windows import plan_windows


def _collect(checkpoint, text, out, **kw):
    return collect(CollectConfig(model=str(checkpoint), texts=[str(text)], out=out, progress=False, **kw))


def test_greedy_store_holds_the_models_own_choices_with_their_routing(tiny_checkpoints, small_corpus, tmp_path):
    checkpoint = tiny_checkpoints["olmoe"]
    store = _collect(
        checkpoint, small_corpus, tmp_path / "g", seq_len=24, generate=10, batch_size=2, save_residuals=True
    )
    assert store.manifest.collection.mode == "greedy" and store.manifest.collection.generated_tokens == 10
    loaded = load_model(str(checkpoint))
    text_windows = [w for w in plan_windows([str(small_corpus)], loaded.tokenizer, 24) if len(w.token_ids) >= 14]
    shard = store.read_shard(0)
    residuals = store.hidden_states(0, "residual_out")
    assert set(shard.windows.tolist()) <= {w.index for w in text_windows}  # windows too short to prompt: skipped
    for window in text_windows[:3]:
        rows = shard.windows == window.index
        sequence = shard.token_ids[rows]
        assert len(sequence) == 24 and list(sequence[:14]) == window.token_ids[:14]
        ids = torch.tensor([sequence.tolist()])
        with torch.no_grad(), RoutingRecorder(loaded, residuals=True) as recorder:
            logits = loaded.model(input_ids=ids).logits[0]
            prefill = recorder.pop()
        # Every continuation token is the argmax after the token before it ...
        assert np.array_equal(logits[13:-1].argmax(-1).numpy(), sequence[14:])
        # ... and the routing recorded step by step through the cache is a prefill's.
        for layer in range(loaded.stacks["decoder"]):
            assert np.array_equal(shard.expert_ids[rows][:, layer], prefill[("decoder", layer)].expert_ids.numpy())
            torch.testing.assert_close(
                residuals[rows][:, layer].float(), prefill[("decoder", layer)].residual_out.half().float()
            )


def test_greedy_mode_refuses_encoder_decoder_models_and_prompts_of_no_tokens(tiny_checkpoints, small_corpus, tmp_path):
    with pytest.raises(InputError, match="decoder-only"):
        _collect(tiny_checkpoints["switch_transformers"], small_corpus, tmp_path / "s", seq_len=16, generate=4)
    with pytest.raises(InputError, match="leave a prompt"):
        _collect(tiny_checkpoints["olmoe"], small_corpus, tmp_path / "o", seq_len=16, generate=16)


def test_greedy_and_prefill_stores_do_not_resume_into_each_other(tiny_checkpoints, small_corpus, tmp_path):
    out = tmp_path / "t"
    _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16)
    with pytest.raises(InputError, match="other settings"):
        _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16, generate=4)
