"""``specmoe collect``: run a model over text and write a resumable trace store.

Work is planned as a deterministic stream of windows (documents in input order, each cut
into ``seq_len``-token windows that never cross a document boundary). Shard i holds windows
``[i * windows_per_shard, (i + 1) * windows_per_shard)``, so a rerun of the same command
skips exactly the shards the manifest lists and recomputes only the one that was in flight.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import specmoe
from specmoe.corpus.builtin import resolve_text_source
from specmoe.corpus.documents import HF_PREFIX, read_documents
from specmoe.errors import InputError
from specmoe.models.loading import LoadedModel, load_model, resolve_model_path
from specmoe.traces.greedy import check_can_generate, continue_greedily
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.schema import CollectionInfo, Manifest, ModelInfo, StackInfo, TokenizerInfo
from specmoe.traces.store import TraceStore, routing_table, sha256_of


@dataclass
class CollectConfig:
    """Settings of one collection run."""

    model: str
    """Hub id, local checkpoint directory, or built-in model name."""
    texts: list[str]
    """Text files (.txt, .jsonl[.gz], .parquet) or ``builtin`` for the shipped corpus."""
    out: Path
    max_tokens: int | None = None
    """Stop after the window that reaches this many tokens (None: all text)."""
    seq_len: int = 128
    batch_size: int = 32
    windows_per_shard: int = 256
    save_router_inputs: bool = False
    save_residuals: bool = False
    dtype: str = "float32"
    trust_remote_code: bool = False
    progress: bool = True
    generate: int = 0
    """Decode mode (decoder-only models): keep each window's first ``seq_len - generate``
    tokens as a prompt and record the model continuing it greedily for ``generate`` tokens
    through its KV cache. Windows shorter than the prompt are skipped."""

    def __post_init__(self):
        if not self.texts:
            raise InputError("give at least one --text source")
        if self.seq_len < 2:
            raise InputError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1 or self.windows_per_shard < 1:
            raise InputError("--batch-size and --windows-per-shard must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"--max-tokens must be positive, got {self.max_tokens}")
        if not 0 <= self.generate < self.seq_len:
            raise InputError(
                f"--generate must be in [0, --seq-len) to leave a prompt of at least one token, "
                f"got {self.generate} with --seq-len {self.seq_len}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        self.out = Path(self.out)

    @property
    def hidden_kinds(self) -> list[str]:
        return [
            kind
            for kind, on in (("router_input", self.save_router_inputs), ("residual_out", self.save_residuals))
            if on
        ]


@dataclass
class Window:
    index: int
    doc_id: str
    doc_group: str
    """Split key: documents of one group (near-duplicates, parallel texts) share a split."""
    token_ids: list[int] = field(repr=False)


def plan_windows(texts: list[str], tokenizer, seq_len: int) -> Iterator[Window]:
    """Deterministic window stream. A BOS token, when the tokenizer has one, starts every window."""
    bos = tokenizer.bos_token_id
    body = seq_len - 1 if bos is not None else seq_len
    index = 0
    for text in texts:
        for doc in read_documents(resolve_text_source(text)):
            ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
            for start in range(0, len(ids), body):
                chunk = ids[start : start + body]
                yield Window(index, doc.doc_id, doc.split_key, ([bos] if bos is not None else []) + chunk)
                index += 1


def greedy_prompts(windows: Iterator[Window], prompt_len: int) -> Iterator[Window]:
    """Each window's first ``prompt_len`` tokens; shorter windows (document ends) are skipped."""
    for window in windows:
        if len(window.token_ids) >= prompt_len:
            yield Window(window.index, window.doc_id, window.doc_group, window.token_ids[:prompt_len])


def limit_tokens(windows: Iterator[Window], max_tokens: int | None, generated: int = 0) -> Iterator[Window]:
    seen = 0
    for window in windows:
        if max_tokens is not None and seen >= max_tokens:
            return
        seen += len(window.token_ids) + generated
        yield window


def model_revision(model: str, loaded: LoadedModel) -> str:
    """What identifies the weights: the hub commit, else a hash of the local files' names,
    sizes and config, so retrained weights never resume into an old store."""
    commit = getattr(loaded.model.config, "_commit_hash", None)
    if commit:
        return commit
    directory = Path(resolve_model_path(model))
    if not directory.is_dir():
        return "unknown"
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in (".safetensors", ".bin", ".json"):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    digest.update((directory / "config.json").read_bytes() if (directory / "config.json").exists() else b"")
    return digest.hexdigest()[:16]


def _new_manifest(cfg: CollectConfig, loaded: LoadedModel, hidden_size: int) -> Manifest:
    texts = [str(resolve_text_source(t)) for t in cfg.texts]
    for path in texts:
        if not path.startswith(HF_PREFIX) and not Path(path).is_file():
            raise InputError(f"text file not found: {path}")
    identity = {
        "model": cfg.model,
        "model_revision": model_revision(cfg.model, loaded),
        "texts": [p if p.startswith(HF_PREFIX) else sha256_of(Path(p)) for p in texts],
        "seq_len": cfg.seq_len,
        "windows_per_shard": cfg.windows_per_shard,
        "max_tokens": cfg.max_tokens,
        "hidden": cfg.hidden_kinds,
        "dtype": cfg.dtype,
        "format": 1,
    }
    if cfg.generate:  # absent otherwise, so prefill stores keep their fingerprint
        identity["generate"] = cfg.generate
    stacks = {
        stack: StackInfo(num_layers=count, block_names=[l.name for l in loaded.layers_of(stack)])
        for stack, count in loaded.stacks.items()
    }
    tok = loaded.tokenizer
    return Manifest(
        specmoe_version=specmoe.__version__,
        model=ModelInfo(
            id=cfg.model,
            model_type=loaded.model_type,
            num_experts=loaded.num_experts,
            top_k=loaded.top_k,
            hidden_size=hidden_size,
            stacks=stacks,
            dtype=cfg.dtype,
        ),
        tokenizer=TokenizerInfo(
            name_or_path=getattr(tok, "name_or_path", cfg.model), vocab_size=len(tok), bos_token_id=tok.bos_token_id
        ),
        collection=CollectionInfo(
            texts=texts,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            windows_per_shard=cfg.windows_per_shard,
            max_tokens=cfg.max_tokens,
            hidden=cfg.hidden_kinds,
            mode="greedy" if cfg.generate else "prefill",
            generated_tokens=cfg.generate,
            decoder_input="shift_right(input_ids): decoder row t holds input token t-1" if len(stacks) > 1 else "",
            fingerprint=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16],
        ),
    )


def _open_or_create(cfg: CollectConfig, fresh: Manifest) -> TraceStore:
    cfg.out.mkdir(parents=True, exist_ok=True)
    if (cfg.out / "manifest.json").exists():
        store = TraceStore.open(cfg.out)
        if store.manifest.collection.fingerprint != fresh.collection.fingerprint:
            raise InputError(
                f"{cfg.out} holds traces collected with other settings or text "
                f"(fingerprint {store.manifest.collection.fingerprint}, this run "
                f"{fresh.collection.fingerprint}); choose another --out or delete it"
            )
        store.remove_unlisted_files()
        return store
    if any(cfg.out.iterdir()):
        raise InputError(f"{cfg.out} exists, is not empty and is not a trace store; choose another --out")
    store = TraceStore(cfg.out, fresh)
    fresh.save(cfg.out)
    return store


def batch_tensors(windows: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``, both (B, S)."""
    width = max(len(w.token_ids) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, window in enumerate(windows):
        input_ids[row, : len(window.token_ids)] = torch.tensor(window.token_ids)
        mask[row, : len(window.token_ids)] = 1
    return input_ids, mask


def run_batch(loaded: LoadedModel, recorder: RoutingRecorder, windows: list[Window], pad_id: int):
    """One forward pass; returns the layer records and the (B*S,) mask of real tokens."""
    input_ids, mask = batch_tensors(windows, pad_id)
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        loaded.adapter.forward(loaded.model, input_ids.to(device), mask.to(device))
    records = recorder.pop()
    keep = mask.reshape(-1).bool()
    expected = input_ids.numel()
    for key, record in records.items():
        if record.expert_ids.shape[0] != expected:
            raise RuntimeError(
                f"layer {key} recorded {record.expert_ids.shape[0]} tokens for a batch of "
                f"{expected}; the adapter does not match this model's forward pass"
            )
    return records, keep


def run_greedy_batch(loaded: LoadedModel, recorder: RoutingRecorder, windows: list[Window], new_tokens: int):
    """Like :func:`run_batch` for decode mode: the windows (equal-length prompts) grow by the
    tokens the model chose, and every fed token is recorded."""
    prompts = torch.tensor([w.token_ids for w in windows])
    sequences, records = continue_greedily(loaded, recorder, prompts, new_tokens)
    for window, row in zip(windows, sequences.tolist()):
        window.token_ids = row
    return records, torch.ones(sequences.numel(), dtype=torch.bool)


class _ShardBuffer:
    """Accumulates one shard's rows batch by batch, then lays them out as (T, L, k) per stack."""

    def __init__(self, stacks: dict[str, int], hidden_kinds: list[str]):
        self.stacks = stacks
        self.hidden_kinds = hidden_kinds
        self.columns: dict[str, list] = {"doc_id": [], "doc_group": [], "window": [], "position": [], "token_id": []}
        self.layers: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))

    def add(self, batch: list[Window], records: dict, keep: torch.Tensor) -> None:
        for window in batch:
            n = len(window.token_ids)
            self.columns["doc_id"] += [window.doc_id] * n
            self.columns["doc_group"] += [window.doc_group] * n
            self.columns["window"] += [window.index] * n
            self.columns["position"] += range(n)
            self.columns["token_id"] += window.token_ids
        for key, record in records.items():
            slot = self.layers[key]
            slot["expert_ids"].append(record.expert_ids[keep])
            slot["gate_weights"].append(record.gate_weights[keep])
            for kind in self.hidden_kinds:
                slot[kind].append(getattr(record, kind)[keep].half())

    def _grid(self, stack: str, field: str) -> np.ndarray:
        per_layer = [torch.cat(self.layers[(stack, i)][field]) for i in range(self.stacks[stack])]
        return torch.stack(per_layer, dim=1).numpy()  # (T, L, ...)

    def finish(self):
        routing = {stack: (self._grid(stack, "expert_ids"), self._grid(stack, "gate_weights")) for stack in self.stacks}
        hidden = {kind: {stack: self._grid(stack, kind) for stack in self.stacks} for kind in self.hidden_kinds}
        columns = {name: np.asarray(values) for name, values in self.columns.items()}
        return routing_table(columns, routing), hidden


def collect(cfg: CollectConfig, loaded: LoadedModel | None = None) -> TraceStore:
    """Collect routing traces into ``cfg.out``; resumes an interrupted run of the same settings."""
    loaded = loaded or load_model(cfg.model, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    hidden_size = int(
        getattr(
            loaded.adapter.text_config(loaded.model.config), "hidden_size", getattr(loaded.model.config, "d_model", 0)
        )
    )
    if cfg.generate:
        check_can_generate(loaded)
    store = _open_or_create(cfg, _new_manifest(cfg, loaded, hidden_size))
    manifest = store.manifest
    if manifest.complete:
        return store
    windows = plan_windows(cfg.texts, tokenizer, cfg.seq_len)
    if cfg.generate:
        windows = greedy_prompts(windows, cfg.seq_len - cfg.generate)
    windows = limit_tokens(windows, cfg.max_tokens, cfg.generate)
    for _ in islice(windows, sum(s.num_windows for s in manifest.shards)):
        pass  # finished shards: skip their windows
    bar = tqdm(
        total=cfg.max_tokens,
        initial=manifest.num_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"collect {cfg.model}",
        disable=not cfg.progress,
    )
    with RoutingRecorder(loaded, router_inputs=cfg.save_router_inputs, residuals=cfg.save_residuals) as recorder:
        while shard_windows := list(islice(windows, cfg.windows_per_shard)):
            buffer = _ShardBuffer(loaded.stacks, cfg.hidden_kinds)
            for first in range(0, len(shard_windows), cfg.batch_size):
                batch = shard_windows[first : first + cfg.batch_size]
                if cfg.generate:
                    records, keep = run_greedy_batch(loaded, recorder, batch, cfg.generate)
                else:
                    records, keep = run_batch(loaded, recorder, batch, pad_id)
                buffer.add(batch, records, keep)
                bar.update(int(keep.sum()))
            table, hidden = buffer.finish()
            store.write_shard(len(manifest.shards), table, hidden, shard_windows[0].index, len(shard_windows))
    bar.close()
    if manifest.num_tokens == 0:
        raise InputError(f"no text to collect: the sources {cfg.texts} hold no tokens")
    manifest.complete = True
    manifest.save(cfg.out)
    return store
