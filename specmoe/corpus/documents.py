"""Documents and the text-file readers behind ``specmoe collect --text``.

Every piece of text carries a document id, because splits are made by document
(docs/design.md, "Evaluation protocol"): windows of one text must never straddle train and test.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from specmoe.errors import InputError


@dataclass(frozen=True)
class Document:
    """One source document.

    Attributes:
        doc_id: stable, unique id; the split hash is computed from it (or from ``group``).
        text: the raw text.
        source: where it came from, e.g. ``"web-bible"`` or a file name.
        group: documents sharing a group (near-duplicates, chapters of one work) always land
            on the same side of a split. Defaults to ``doc_id``.
    """

    doc_id: str
    text: str
    source: str = ""
    group: str = ""

    @property
    def split_key(self) -> str:
        return self.group or self.doc_id


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _read_jsonl(path: Path) -> Iterator[Document]:
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
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
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise InputError(f"{path}: cannot read as Parquet ({exc})") from None
    if "text" not in table.column_names:
        raise InputError(f'{path}: Parquet file has no "text" column (columns: {table.column_names})')
    texts = table.column("text").to_pylist()
    id_col = next((c for c in ("id", "doc_id") if c in table.column_names), None)
    ids = table.column(id_col).to_pylist() if id_col else [f"{path.name}:{i}" for i in range(len(texts))]
    for doc_id, text in zip(ids, texts):
        if text:
            yield Document(str(doc_id), text, path.name)


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
    file is plain UTF-8 text and is one document whose id is the file name.
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
    else:
        try:
            with _open_text(path) as handle:
                text = handle.read()
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text (give .txt, .jsonl or .parquet)") from None
        if text.strip():
            yield Document(path.name, text, path.name)


def write_jsonl_gz(documents: list[Document], path: Path) -> None:
    """Write documents as gzipped JSONL, the format of the shipped corpus."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the file byte-identical across rebuilds.
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        for doc in documents:
            record = {"id": doc.doc_id, "source": doc.source, "group": doc.group, "text": doc.text}
            raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
