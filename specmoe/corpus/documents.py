"""Documents and the text-file readers behind ``specmoe collect --text``.

Every piece of text carries a document id, because splits are made by document
(docs/design.md, "Evaluation protocol"): windows of one text must never straddle train and test.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from specmoe.errors import InputError, storage_error

PIECE_CHARS = 1 << 16
"""Characters handed to a tokenizer at once: memory stays bounded whatever a document's length."""


@dataclass(frozen=True)
class Document:
    """One source document.

    Attributes:
        doc_id: stable, unique id; the split hash is computed from it (or from ``group``).
        text: the raw text.
        source: where it came from, e.g. ``"web-bible"`` or a file name.
        group: documents sharing a group (near-duplicates, chapters of one work) always land
            on the same side of a split. Defaults to ``doc_id``.
        reader: for a document read lazily (a plain-text file), yields its text block by
            block; ``text`` is then empty. Read it through :meth:`blocks`.
    """

    doc_id: str
    text: str
    source: str = ""
    group: str = ""
    reader: Callable[[], Iterator[str]] | None = field(default=None, compare=False, repr=False)

    @property
    def split_key(self) -> str:
        return self.group or self.doc_id

    def blocks(self) -> Iterator[str]:
        """The text, in blocks of any size (one block unless the document is read lazily)."""
        if self.reader is None:
            yield self.text
        else:
            yield from self.reader()


def _cut(text: str, limit: int) -> int:
    """Where to end a piece of at most ``limit`` characters: before a space that follows and
    precedes a non-space (a byte-level BPE pre-tokenizer starts a word with its space there,
    so tokenising piece by piece gives the whole text's tokens), else after any whitespace,
    else at ``limit``."""
    position = text.rfind(" ", 1, limit + 1)
    while position > 0:
        if position + 1 < len(text) and not text[position - 1].isspace() and not text[position + 1].isspace():
            return position
        position = text.rfind(" ", 1, position)
    for position in range(limit, 0, -1):
        if text[position - 1].isspace():
            return position
    return limit


def text_pieces(blocks: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
    """Re-cut a stream of text blocks into pieces of at most ``max_chars`` characters, cut
    where tokenisation does not change (see :func:`_cut`); a piece holds at most
    ``2 * max_chars`` characters in memory (default :data:`PIECE_CHARS`)."""
    max_chars = max_chars or PIECE_CHARS
    pending = ""
    for block in blocks:
        pending += block
        while len(pending) > max_chars:
            cut = _cut(pending, max_chars)
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _open_bytes(path: Path):
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    except OSError as exc:
        raise storage_error(exc, path) from None


def _read_jsonl(path: Path) -> Iterator[Document]:
    with _open_bytes(path) as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{line_no}: not UTF-8 (byte {exc.start} of the line); fix or drop it"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f'{path}:{line_no}: expected an object with a string "text" field')
            doc_id = str(record.get("id", record.get("doc_id", f"{path.name}:{line_no}")))
            yield Document(doc_id, record["text"], str(record.get("source", path.name)), str(record.get("group", "")))


def _read_parquet(path: Path) -> Iterator[Document]:
    """Row group by row group (small batches), so a large file is never in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read as Parquet ({exc})") from None
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise InputError(f'{path}: Parquet file has no "text" column (columns: {names})')
    id_col = next((c for c in ("id", "doc_id") if c in names), None)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=64, columns=["text"] + ([id_col] if id_col else [])):
            texts = batch.column("text").to_pylist()
            ids = batch.column(id_col).to_pylist() if id_col else [f"{path.name}:{row + i}" for i in range(len(texts))]
            row += len(texts)
            for doc_id, text in zip(ids, texts):
                if text:
                    yield Document(str(doc_id), text, path.name)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read as Parquet ({exc})") from None


def _read_text_blocks(path: Path, block_chars: int = PIECE_CHARS) -> Iterator[str]:
    try:
        with _open_text(path) as handle:
            while block := handle.read(block_chars):
                yield block
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (give .txt, .jsonl or .parquet)") from None
    except OSError as exc:
        raise storage_error(exc, path) from None


HF_PREFIX = "hf:"


def _read_hf_dataset(spec: str) -> Iterator[Document]:
    """``hf:NAME[:SPLIT[:COLUMN]]``, streamed with the ``datasets`` library (needs network)."""
    name, split, column = (spec[len(HF_PREFIX) :].split(":") + ["train", "text"])[:3]
    try:
        from datasets import load_dataset
    except ImportError:
        raise InputError(f"{spec}: reading Hugging Face datasets needs `pip install datasets`") from None
    try:
        dataset = load_dataset(name, split=split, streaming=True)
        for i, record in enumerate(dataset):
            if column not in record:
                raise InputError(f"{spec}: no column {column!r} (columns: {sorted(record)})")
            yield Document(str(record.get("id", f"{name}/{split}/{i}")), record[column], name)
    except (OSError, ValueError, ConnectionError) as exc:
        raise InputError(f"{spec}: cannot load dataset {name!r} split {split!r} ({exc})") from None


def read_documents(path: str | Path) -> Iterator[Document]:
    """Yield the documents of a text source.

    ``.jsonl``/``.jsonl.gz``: one JSON object per line with ``text`` (and optionally ``id``,
    ``source``, ``group``). ``.parquet``: a ``text`` column (and optionally ``id``). Any other
    file is plain UTF-8 text and is one document whose id is the file name, read lazily
    (:meth:`Document.blocks`).
    ``hf:NAME[:SPLIT[:COLUMN]]`` streams a Hugging Face dataset (online only).
    """
    if str(path).startswith(HF_PREFIX):
        yield from _read_hf_dataset(str(path))
        return
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_jsonl(path)
    elif name.endswith(".parquet"):
        yield from _read_parquet(path)
    else:  # read lazily: a file may hold one document of any size
        yield Document(path.name, "", path.name, reader=lambda: _read_text_blocks(path))


def write_jsonl_gz(documents: list[Document], path: Path) -> None:
    """Write documents as gzipped JSONL, the format of the shipped corpus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the file byte-identical across rebuilds.
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        for doc in documents:
            record = {"id": doc.doc_id, "source": doc.source, "group": doc.group, "text": doc.text}
            raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
