"""Decode-mode collection: the model's own greedy continuation, fed back one step at a time."""

import json

import numpy as np
import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.traces import batches
from specmoe.traces.collector import PREFILL_WINDOWS_PER_SHARD, CollectConfig, collect, resolve_shard_size
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.store import TraceStore
from specmoe.traces.windows import plan_windows


def _collect(checkpoint, text, out, **kw):
    return collect(CollectConfig(model=str(checkpoint), texts=[str(text)], out=out, progress=False, **kw))


def test_greedy_store_holds_the_models_own_choices_with_their_routing(tiny_checkpoints, small_corpus, tmp_path):
    checkpoint = tiny_checkpoints["olmoe"]
    store = _collect(
        checkpoint,
        small_corpus,
        tmp_path / "g",
        seq_len=24,
        generate=10,
        batch_size=2,
        windows_per_shard=4,  # the windows checked below in one shard
        save_residuals=True,
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


def test_a_new_store_takes_one_batch_per_shard_when_decoding_and_a_resumed_one_keeps_its_own(tmp_path):
    def size(out, **kw):
        return resolve_shard_size(CollectConfig(model="m", texts=["t"], out=out, seq_len=16, **kw))

    assert size(tmp_path / "new") == PREFILL_WINDOWS_PER_SHARD
    assert size(tmp_path / "new", generate=4, batch_size=3) == 3
    assert size(tmp_path / "new", generate=4, batch_size=3, windows_per_shard=7) == 7
    started = tmp_path / "started"
    started.mkdir()
    (started / "manifest.json").write_text(json.dumps({"collection": {"windows_per_shard": 64}}))
    assert size(started, generate=4, batch_size=3) == 64


def test_an_interrupted_decode_loses_only_the_batch_in_flight(tiny_checkpoints, small_corpus, tmp_path, monkeypatch):
    settings = {"seq_len": 16, "generate": 6, "batch_size": 2}
    clean = _collect(tiny_checkpoints["olmoe"], small_corpus, tmp_path / "clean", **settings)
    assert clean.manifest.collection.windows_per_shard == 2 and len(clean.manifest.shards) >= 3
    decode, calls = batches.run_greedy_batch, []

    def interrupted_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the decoding loop
        return decode(*args, **kwargs)

    monkeypatch.setattr(batches, "run_greedy_batch", interrupted_at_the_third_batch)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        _collect(tiny_checkpoints["olmoe"], small_corpus, killed, **settings)
    assert len(TraceStore.open(killed).manifest.shards) == 2  # both finished batches were committed
    monkeypatch.setattr(batches, "run_greedy_batch", decode)
    resumed = _collect(tiny_checkpoints["olmoe"], small_corpus, killed, **settings)
    assert resumed.manifest.num_tokens == clean.manifest.num_tokens
    for a, b in zip(resumed.iter_shards(), clean.iter_shards(), strict=True):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.expert_ids, b.expert_ids)
