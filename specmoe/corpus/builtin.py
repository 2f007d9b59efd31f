"""The corpus shipped inside the package (see ``data/LICENSES.md``)."""

from __future__ import annotations

from pathlib import Path

from specmoe.corpus.documents import Document, read_documents

BUILTIN_NAME = "builtin"
BUILTIN_PATH = Path(__file__).parent / "data" / "builtin.jsonl.gz"


def resolve_text_source(name_or_path: str) -> Path:
    """``"builtin"`` names the shipped corpus; anything else is a file path."""
    return BUILTIN_PATH if name_or_path == BUILTIN_NAME else Path(name_or_path)


def load_builtin_corpus() -> list[Document]:
    return list(read_documents(BUILTIN_PATH))
