"""The trace store's manifest: everything needed to interpret the shards beside it.

Routing goes to Parquet (columnar, zstd-compressed, readable by pandas/duckdb/polars,
column projection and row-group streaming for free). Hidden states go to safetensors, one
file per shard and kind: dense fp16 tensors that are memory-mapped zero-copy into torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from specmoe.errors import CorruptStoreError
from specmoe.storage import atomic
from specmoe.storage.paths import UnsafePathError, check_name

FORMAT = "specmoe-traces"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HIDDEN_KINDS = ("router_input", "residual_out")


class StackInfo(BaseModel):
    num_layers: int = Field(ge=1)
    block_names: list[str]
    """Module name of each MoE layer's block, e.g. ``model.layers.3.mlp``."""


class ModelInfo(BaseModel):
    id: str
    model_type: str
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    hidden_size: int
    stacks: dict[str, StackInfo]
    dtype: str
    revision: str | None = None
    """What identifies the weights (hub commit, else a hash of the local files); stores
    written before it was recorded have None and cannot be merged."""


class TokenizerInfo(BaseModel):
    name_or_path: str
    vocab_size: int
    bos_token_id: int | None = None


class MergedStore(BaseModel):
    """One input of a merge, as it was: its texts were collected on their own."""

    fingerprint: str
    texts: list[str]
    max_tokens: int | None
    num_tokens: int
    window_offset: int
    """Added to this store's window indices in the merged store (windows stay unique)."""


class CollectionInfo(BaseModel):
    texts: list[str]
    seq_len: int
    batch_size: int
    windows_per_shard: int
    max_tokens: int | None
    hidden: list[str] = []
    """Which hidden-state kinds were saved (subset of ``router_input``, ``residual_out``)."""
    mode: str = "prefill"
    """``prefill``: the text's tokens; ``greedy``: prompts continued by the model's own choices."""
    generated_tokens: int = 0
    """In ``greedy`` mode, how many of each window's tokens the model chose (the last ones)."""
    decoder_input: str = ""
    """For encoder-decoder models: how the decoder input was formed."""
    fingerprint: str
    """Hash of everything above that determines the data; a resumed run must match it."""
    merged_from: list[MergedStore] = []
    """For a store made by ``specmoe traces merge``: the stores it combines, in row order."""


class FileEntry(BaseModel):
    file: str
    """A file name inside the store directory (never a path: see ``_plain_name``)."""
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        try:
            return check_name(value, "file")
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None


class ShardEntry(BaseModel):
    index: int = Field(ge=0)
    routing: FileEntry
    hidden: dict[str, FileEntry] = {}
    num_tokens: int = Field(ge=0)
    first_window: int = Field(ge=0)
    num_windows: int = Field(ge=0)

    @field_validator("hidden")
    @classmethod
    def _known_kinds(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(HIDDEN_KINDS))
        if unknown:
            raise ValueError(f"unknown hidden-state kinds {unknown}; known: {list(HIDDEN_KINDS)}")
        return value


class Manifest(BaseModel):
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    specmoe_version: str
    model: ModelInfo
    tokenizer: TokenizerInfo
    collection: CollectionInfo
    shards: list[ShardEntry] = []
    complete: bool = False
    num_tokens: int = 0

    def save(self, directory: Path) -> None:
        """Atomic: a kill leaves either the old manifest or the new one, never half of one."""
        atomic.write_text(directory / MANIFEST, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.is_file():
            raise CorruptStoreError(
                f"{directory} is not a trace store: no {MANIFEST} (create one with `specmoe collect`)"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptStoreError(f"{path}: manifest is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if raw.get("format") != FORMAT:
            raise CorruptStoreError(f"{path}: not a specmoe trace manifest (format={raw.get('format')!r})")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CorruptStoreError(
                f"{path}: format version {raw['format_version']} is newer than this "
                f"specmoe understands ({FORMAT_VERSION}); upgrade specmoe"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise CorruptStoreError(f"{path}: manifest does not match the schema:\n{exc}") from None
