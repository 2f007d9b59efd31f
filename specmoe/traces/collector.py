"""``specmoe collect``: run a model over text and write a resumable trace store.

Work is planned as a deterministic stream of windows (documents in input order, each cut
into ``seq_len``-token windows that never cross a document boundary). Shard i holds windows
``[i * windows_per_shard, (i + 1) * windows_per_shard)``, so a rerun of the same command
skips exactly the shards the manifest lists and recomputes only the one that was in flight.
Under torchrun the same plan is shared out shard by shard over the processes
(:mod:`specmoe.traces.distributed`); the running of batches is in :mod:`specmoe.traces.batches`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch

import specmoe
from specmoe.corpus.builtin import resolve_text_source
from specmoe.corpus.documents import HF_PREFIX
from specmoe.errors import InputError
from specmoe.models.loading import LoadedModel, load_model, resolve_model_path
from specmoe.models.placement import check_placement, load_kwargs
from specmoe.storage import atomic
from specmoe.storage.integrity import sha256_file
from specmoe.storage.locks import DirectoryLock
from specmoe.storage.paths import is_project_metadata
from specmoe.torchrun import ControlChannel, init_process_group
from specmoe.traces.batches import write_shards
from specmoe.traces.distributed import (
    RANKS_DIR,
    assemble,
    check_existing_store,
    check_world_size,
    open_rank_part,
    owns,
)
from specmoe.traces.greedy import check_can_generate
from specmoe.traces.schema import CollectionInfo, Manifest, ModelInfo, StackInfo, TokenizerInfo
from specmoe.traces.store import TraceStore
from specmoe.traces.windows import Window, greedy_prompts, limit_tokens, plan_windows


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
    windows_per_shard: int | None = None
    """The unit of resumption: a kill loses the shard in flight. None: the existing store's
    (a resumed store keeps its shards), else :func:`default_shard_size`."""
    save_router_inputs: bool = False
    save_residuals: bool = False
    dtype: str = "float32"
    trust_remote_code: bool = False
    progress: bool = True
    generate: int = 0
    """Decode mode (decoder-only models): keep each window's first ``seq_len - generate``
    tokens as a prompt and record the model continuing it greedily for ``generate`` tokens
    through its KV cache. Windows shorter than the prompt are skipped."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto: this process's GPU (``LOCAL_RANK`` under torchrun) if any, else cpu."""
    device_map: str | None = None
    """Spread the model over this process's GPUs, CPU memory and disk with accelerate
    (auto, balanced, balanced_low_0 or sequential), for models larger than one device."""
    max_memory: str | None = None
    """With ``device_map``: budget per device, e.g. ``gpu=70GiB,cpu=200GiB``."""
    offload_folder: Path | None = None
    """With ``device_map``: where weights that fit on no device are kept (accelerate's disk offload)."""

    def __post_init__(self):
        if not self.texts:
            raise InputError("give at least one --text source")
        if self.seq_len < 2:
            raise InputError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1 or (self.windows_per_shard is not None and self.windows_per_shard < 1):
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
        check_placement(self.device, self.device_map, self.max_memory, self.offload_folder)
        self.out = Path(self.out)

    @property
    def hidden_kinds(self) -> list[str]:
        return [
            kind
            for kind, on in (("router_input", self.save_router_inputs), ("residual_out", self.save_residuals))
            if on
        ]


PREFILL_WINDOWS_PER_SHARD = 256


def default_shard_size(generate: int, batch_size: int) -> int:
    """Windows per shard of a new store: 256 when prefilling (a batch takes a forward pass);
    one batch when decoding (a batch takes ``generate`` steps, minutes on a large model, so a
    kill near the end of a long decode loses one batch, not hundreds of windows)."""
    return batch_size if generate else PREFILL_WINDOWS_PER_SHARD


def resolve_shard_size(cfg: CollectConfig) -> int:
    """``--windows-per-shard`` as given, else the existing store's, else the default."""
    if cfg.windows_per_shard is not None:
        return cfg.windows_per_shard
    try:
        stored = json.loads((cfg.out / "manifest.json").read_text())["collection"]["windows_per_shard"]
    except (OSError, ValueError, KeyError, TypeError):  # no store yet, or one open_or_create will judge
        stored = None
    if isinstance(stored, int) and stored > 0:
        return stored
    return default_shard_size(cfg.generate, cfg.batch_size)


def plan_shards(cfg: CollectConfig, tokenizer) -> Iterator[tuple[int, list[Window]]]:
    """``(shard index, its windows)`` for the whole collection, the same in every process."""
    windows = plan_windows(cfg.texts, tokenizer, cfg.seq_len)
    if cfg.generate:
        windows = greedy_prompts(windows, cfg.seq_len - cfg.generate)
    windows = limit_tokens(windows, cfg.max_tokens, cfg.generate)
    index = 0
    while shard_windows := list(islice(windows, cfg.windows_per_shard)):
        yield index, shard_windows
        index += 1


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


def _fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _new_manifest(cfg: CollectConfig, loaded: LoadedModel, hidden_size: int) -> tuple[Manifest, str]:
    """The manifest of a new store for ``cfg``, and the fingerprint that stores written before
    the batch size joined it carry for the same settings."""
    texts = [str(resolve_text_source(t)) for t in cfg.texts]
    for path in texts:
        if not path.startswith(HF_PREFIX) and not Path(path).is_file():
            raise InputError(f"text file not found: {path}")
    revision = model_revision(cfg.model, loaded)
    identity = {
        "model": cfg.model,
        "model_revision": revision,
        "texts": [p if p.startswith(HF_PREFIX) else sha256_file(Path(p)) for p in texts],
        "seq_len": cfg.seq_len,
        "windows_per_shard": cfg.windows_per_shard,
        "max_tokens": cfg.max_tokens,
        "hidden": cfg.hidden_kinds,
        "dtype": cfg.dtype,
        "format": 1,
    }
    if cfg.generate:  # absent otherwise, so prefill stores keep their fingerprint
        identity["generate"] = cfg.generate
    devices = sorted({parameter.device.type for parameter in loaded.model.parameters()})
    if devices != ["cpu"]:  # another device's arithmetic; absent on CPU, so CPU stores keep their fingerprint
        identity["devices"] = devices
    legacy = _fingerprint(identity)
    # A batch pads its windows to one length and changes the shapes of the arithmetic, which
    # can flip a near-tie in the routing: the batch size changes the data.
    identity["batch_size"] = cfg.batch_size
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
            revision=revision,
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
            fingerprint=_fingerprint(identity),
        ),
    ), legacy


def open_or_create(out: Path, fresh: Manifest, world: int = 1, legacy_fingerprint: str | None = None) -> TraceStore:
    """The store in ``out`` if it was started with ``fresh``'s settings (to resume), else a new
    one. ``legacy_fingerprint``: what a store written before the batch size joined the
    fingerprint carries for these settings. Call with ``out`` locked."""
    atomic.remove_temporaries(out)  # what a killed writer left, the first manifest write included
    if (out / "manifest.json").exists():
        store = TraceStore.open(out)
        if not store.manifest.shards and not (out / RANKS_DIR).exists():
            fresh.save(out)  # a run that failed before its first shard left nothing to keep
            return TraceStore(out, fresh)
        stored = store.manifest.collection
        legacy = stored.fingerprint == legacy_fingerprint and stored.batch_size == fresh.collection.batch_size
        if stored.fingerprint != fresh.collection.fingerprint and not legacy:
            raise InputError(
                f"{out} holds traces collected with other settings or text "
                f"(fingerprint {store.manifest.collection.fingerprint}, this run "
                f"{fresh.collection.fingerprint}); choose another --out or delete it"
            )
        check_world_size(out, store.manifest, world)
        if world == 1:  # under torchrun each rank cleans up after its own shards
            store.remove_unlisted_files()
        return store
    if any(not is_project_metadata(p.name) for p in out.iterdir()):
        raise InputError(f"{out} exists, is not empty and is not a trace store; choose another --out")
    store = TraceStore(out, fresh)
    fresh.save(out)
    return store


def collect(cfg: CollectConfig, loaded: LoadedModel | None = None) -> TraceStore:
    """Collect routing traces into ``cfg.out``; resumes an interrupted run of the same settings.
    Under torchrun the shards are shared out over the job's processes (see
    :mod:`specmoe.traces.distributed`); the store is the same as one process would write.
    ``cfg.out`` is locked meanwhile, shared by the ranks of one job."""
    with DirectoryLock(cfg.out, "specmoe collect"):
        return _collect_locked(cfg, loaded)


def _collect_locked(cfg: CollectConfig, loaded: LoadedModel | None) -> TraceStore:
    cfg = replace(cfg, windows_per_shard=resolve_shard_size(cfg))
    world = init_process_group()[1]
    control = ControlChannel(world)
    # A resume with another rank count is refused before a model that may take minutes loads.
    control.on_main(lambda: check_existing_store(cfg.out, world))
    loaded = loaded or load_model(
        cfg.model,
        dtype=getattr(torch, cfg.dtype),
        trust_remote_code=cfg.trust_remote_code,
        **load_kwargs(cfg.device, cfg.device_map, cfg.max_memory, cfg.offload_folder),
    )
    hidden_size = int(
        getattr(
            loaded.adapter.text_config(loaded.model.config), "hidden_size", getattr(loaded.model.config, "d_model", 0)
        )
    )
    if cfg.generate:
        check_can_generate(loaded)
    fresh, legacy = _new_manifest(cfg, loaded, hidden_size)
    if world > 1:
        return _collect_sharded(cfg, loaded, fresh, legacy, control, world)
    store = open_or_create(cfg.out, fresh, legacy_fingerprint=legacy)
    manifest = store.manifest
    if manifest.complete:
        return store
    done = len(manifest.shards)
    shards = (shard for shard in plan_shards(cfg, loaded.tokenizer) if shard[0] >= done)
    write_shards(cfg, loaded, shards, store, desc=f"collect {cfg.model}", total=cfg.max_tokens)
    if manifest.num_tokens == 0:
        raise InputError(f"no text to collect: the sources {cfg.texts} hold no tokens")
    manifest.complete = True
    manifest.save(cfg.out)
    return store


def _collect_sharded(
    cfg: CollectConfig, loaded: LoadedModel, fresh: Manifest, legacy: str, control: ControlChannel, world: int
) -> TraceStore:
    rank = control.rank
    if not control.on_main(lambda: open_or_create(cfg.out, fresh, world, legacy).manifest.complete):
        part = open_rank_part(cfg.out, fresh, rank, world)
        done = {shard.index for shard in part.manifest.shards}
        shards = (
            shard
            for shard in plan_shards(cfg, loaded.tokenizer)
            if owns(shard[0], rank, world) and shard[0] not in done
        )
        # Rank 0's bar stands for the job: each rank holds about 1/world of the tokens.
        total = -(-cfg.max_tokens // world) if cfg.max_tokens else None
        write_shards(
            cfg, loaded, shards, part, desc=f"collect {cfg.model} (rank 0 of {world})", total=total, show=rank == 0
        )
        control.barrier()
        control.on_main(lambda: assemble(cfg.out, world))
    return TraceStore.open(cfg.out)
