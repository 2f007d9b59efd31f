"""The pieces of the built-in models' training script."""

import random

import torch

from specmoe.models.builtin.train import SPECIAL_TOKENS, span_corrupt, token_windows


def test_span_corruption_hides_spans_that_the_target_restores():
    window = torch.arange(100, 228)
    sentinels = list(range(3, 3 + 32))
    inputs, targets = span_corrupt(window, sentinels, eos_id=1, rng=random.Random(0))
    assert inputs[-1] == 1 and targets[-1] == 1
    # Re-insert each target span at its sentinel: the original window comes back.
    spans, current = {}, None
    for tok in targets[:-1]:
        if tok in sentinels:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    restored = [t for tok in inputs[:-1] for t in (spans[tok] if tok in sentinels else [tok])]
    assert restored == window.tolist()
    hidden = sum(map(len, spans.values()))
    assert 0.05 * len(window) < hidden < 0.4 * len(window)


def test_windows_never_mix_documents():
    windows = token_windows([list(range(10)), list(range(100, 107))], seq_len=4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [100, 101, 102, 103]]


def test_special_tokens_start_with_pad_eos_unk():
    assert SPECIAL_TOKENS[:3] == ["<pad>", "</s>", "<unk>"] and len(SPECIAL_TOKENS) == 35
