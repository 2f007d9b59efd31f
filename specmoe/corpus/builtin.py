"""The corpus shipped inside the package (see ``data/LICENSES.md``)."""

from __future__ import annotations

from pathlib import Path

from specmoe.corpus.documents import HF_PREFIX, Document, read_documents
from specmoe.errors import InputError

BUILTIN_NAME = "builtin"
BUILTIN_PATH = Path(__file__).parent / "data" / "builtin.jsonl.gz"


def resolve_text_source(name_or_path: str) -> Path:
    """``"builtin"`` names the shipped corpus; anything else is a file path."""
    return BUILTIN_PATH if name_or_path == BUILTIN_NAME else Path(name_or_path)


def check_text_sources(texts: list[str]) -> None:
    """Every text source exists (checked before a model loads, which may take minutes)."""
    for text in texts:
        if not text.startswith(HF_PREFIX) and not resolve_text_source(text).is_file():
            raise InputError(
                f"text file not found: {text} (give a .txt, .jsonl[.gz] or .parquet file, builtin or hf:NAME)"
            )


def load_builtin_corpus() -> list[Document]:
    return list(read_documents(BUILTIN_PATH))
