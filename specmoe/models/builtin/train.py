"""Train the built-in MoE models on the shipped corpus, on CPU, in minutes.

    specmoe models train-builtin switch-128e --steps 1200
    specmoe models train-builtin olmoe-64e --steps 1200
    specmoe models train-builtin mixtral-32e --steps 1200

All use transformers' own classes (``SwitchTransformersForConditionalGeneration`` with
T5 span corruption, ``OlmoeForCausalLM`` and ``MixtralForCausalLM`` with next-token
prediction), so the result is an ordinary Hugging Face checkpoint: ``from_pretrained(dir)``
loads it like any other.
The run writes ``training.json`` (loss curve, per-layer routing entropy) beside the weights.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from specmoe.corpus.builtin import load_builtin_corpus
from specmoe.models.builtin.specs import BUILTIN_DIR, BUILTIN_SPECS, BuiltinSpec

NUM_SENTINELS = 32
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]


@dataclass
class TrainSettings:
    """Optimisation settings for a built-in model."""

    steps: int = 1200
    """Optimizer steps (a fixed count, so a rerun reproduces the shipped model)."""
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over the corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=512,
    )


def token_windows(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    """Cut every document into non-overlapping windows of ``seq_len`` tokens (no packing
    across documents, so a window never mixes two texts)."""
    windows = [ids[i : i + seq_len] for ids in token_lists for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return torch.tensor(windows, dtype=torch.long)


def span_corrupt(
    window: torch.Tensor,
    sentinel_ids: list[int],
    eos_id: int,
    rng: random.Random,
    noise: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """T5 span corruption: replace ~15% of tokens, in spans of mean length 3, by sentinels;
    the target lists each sentinel followed by the tokens it hid."""
    tokens = window.tolist()
    n_spans = max(1, min(len(sentinel_ids), round(len(tokens) * noise / mean_span)))
    starts = sorted(rng.sample(range(len(tokens) - 1), n_spans))
    inputs, targets, pos = [], [], 0
    for span_no, start in enumerate(starts):
        if start < pos:
            continue
        length = max(1, round(rng.expovariate(1 / mean_span)))
        inputs += tokens[pos:start] + [sentinel_ids[span_no]]
        targets += [sentinel_ids[span_no]] + tokens[start : start + length]
        pos = start + length
    inputs += tokens[pos:] + [eos_id]
    targets += [eos_id]
    return inputs, targets


def _pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def make_batch(spec: BuiltinSpec, windows: torch.Tensor, tokenizer, rng: random.Random) -> dict:
    if spec.objective == "causal_lm":
        return {"input_ids": windows, "labels": windows}
    sentinel_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[3:])
    pairs = [span_corrupt(w, sentinel_ids, tokenizer.eos_token_id, rng) for w in windows]
    input_ids, attention_mask = _pad([p[0] for p in pairs], tokenizer.pad_token_id)
    labels, _ = _pad([p[1] for p in pairs], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _lr_at(step: int, total: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total - settings.warmup_steps))
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_builtin(name: str, settings: TrainSettings, out_dir: Path | None = None) -> Path:
    """Train the built-in model ``name`` and save it as a Hugging Face checkpoint."""
    spec = BUILTIN_SPECS[name]
    out_dir = Path(out_dir or BUILTIN_DIR / name)
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    rng = random.Random(settings.seed)

    documents = load_builtin_corpus()
    tokenizer = train_tokenizer([d.text for d in documents], spec.vocab_size)
    token_lists = [tokenizer(d.text, add_special_tokens=False, verbose=False)["input_ids"] for d in documents]
    windows = token_windows(token_lists, settings.seq_len)
    model = spec.build_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    history, start, step = [], time.perf_counter(), 0
    bar = tqdm(total=settings.steps, desc=f"train {name}", unit="step")
    while step < settings.steps:
        order = torch.randperm(len(windows))
        for first in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
            if step >= settings.steps:
                break
            elapsed = time.perf_counter() - start
            batch = make_batch(spec, windows[order[first : first + settings.batch_size]], tokenizer, rng)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, settings.steps, settings)
            loss = model(**batch, output_router_logits=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update()
            if step % 20 == 0:
                history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(loss.item(), 4)})
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "name": name,
        "settings": asdict(settings),
        "steps": step,
        "tokens_seen": step * settings.batch_size * settings.seq_len,
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "num_documents": len(documents),
        "num_windows": len(windows),
        "command": f"specmoe models train-builtin {name} --steps {settings.steps} --seed {settings.seed}",
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
    return out_dir
