"""Bounded memory, proven: `specmoe serve` of a checkpoint whose experts are 4x the fast tier
stays within the non-expert weights + the fast tier + a stated overhead, measured as the
kernel counts it (the process's peak resident set, VmHWM) in a process of its own."""

import json
import os
import subprocess
import sys

import pytest

from specmoe.models.random_checkpoint import write_random_checkpoint

FIXED = 96 << 20
"""The stated fixed overhead beyond the process's base: the tokenizer, the expert index, the
code of the loader and of the generation loop (about 70 MB measured here), and allocator
noise."""

BASE = """
import torch, transformers, specmoe.cli
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from specmoe.memory import peak_rss_bytes
with init_empty_weights(include_buffers=False):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({path!r}))
print(peak_rss_bytes())
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An OLMoE-style checkpoint with 200 MB of bf16 experts and 10 MB of everything else."""
    shape = {"num_hidden_layers": 8, "num_experts": 32, "hidden_size": 256, "intermediate_size": 512}
    shape |= {"vocab_size": 8192, "num_attention_heads": 4, "num_key_value_heads": 4}
    return write_random_checkpoint("olmoe", tmp_path_factory.mktemp("big") / "ckpt", overrides=shape, progress=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak resident memory is read from /proc")
def test_serve_stays_within_the_non_expert_weights_the_fast_tier_and_the_stated_overhead(checkpoint, tmp_path):
    env = {**os.environ, "SPECMOE_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"}
    base = int(
        subprocess.run(
            [sys.executable, "-c", BASE.format(path=str(checkpoint))],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.split()[-1]
    )
    serve = [sys.executable, "-m", "specmoe", "serve", "--model", str(checkpoint), "--prompt", "In the beginning"]
    result = subprocess.run(
        [*serve, "--fast-tier", "25%", "--max-new-tokens", "4"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    expert = stats["bytes_read"] // (stats["demand_reads"] + stats["prefetch_reads"])
    all_experts = 8 * 32 * expert
    assert all_experts >= 4 * stats["fast_tier_bytes"]
    # the overhead the README states: two expert reads in flight, and one transient copy of the
    # largest weight matrix that CPU matmul kernels may make (the 4 MB LM head here)
    largest = 8192 * 256 * 2
    bound = base + stats["non_expert_bytes"] + stats["fast_tier_bytes"] + 2 * expert + largest + FIXED
    assert stats["peak_rss_bytes"] <= bound, (stats["peak_rss_bytes"] - bound) / 2**20
    # the experts never were in memory at once: holding them would have cost this much more
    assert bound < base + stats["non_expert_bytes"] + all_experts
    again = subprocess.run(
        [*serve, "--fast-tier", "25%", "--max-new-tokens", "4"], capture_output=True, text=True, env=env
    )
    assert "writing the expert store" in result.stdout and "writing the expert store" not in again.stdout
