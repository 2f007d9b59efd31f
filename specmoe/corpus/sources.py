"""Offline text sources, read from Debian / PyPI packages when they are installed.

``specmoe corpus build`` turns them into a JSONL corpus; the shipped sample
(``specmoe/corpus/data/builtin.jsonl.gz``) is the same builder restricted to the two
sources whose licences allow redistribution: the World English Bible (public domain) and
the Python documentation (PSF-2.0). See ``specmoe/corpus/data/LICENSES.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

from specmoe.corpus.documents import Document
from specmoe.errors import InputError

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
SWORD_ROOT = Path("/usr/share/sword")
WEB_MODULE = "engWEB2015eb"
FORTUNES = Path("/usr/share/games/fortunes")

# Books with long parallel passages: each family is one split group, so a parallel
# passage can never sit in train while its twin sits in test.
_PARALLEL_BOOKS = {
    **dict.fromkeys(["Matthew", "Mark", "Luke"], "synoptic-gospels"),
    **dict.fromkeys(
        ["I Samuel", "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles"], "samuel-kings-chronicles"
    ),
}
_RST_RULE = re.compile(r"^\s*([=\-~^*#+`'\".:_])\1{3,}\s*$")


def web_bible() -> Iterator[Document]:
    """World English Bible, one document per chapter (Debian ``sword-text-web``; needs pysword)."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise InputError("the web-bible source needs pysword: pip install 'specmoe[corpus]'") from None
    if not (SWORD_ROOT / "mods.d" / f"{WEB_MODULE}.conf").exists():
        raise InputError("the web-bible source needs Debian's sword-text-web: apt-get install sword-text-web")
    modules = SwordModules(str(SWORD_ROOT))
    modules.parse_modules()
    bible = modules.get_bible_from_module(WEB_MODULE)
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            for chapter in range(1, book.num_chapters + 1):
                text = bible.get(books=[book.name], chapters=[chapter], join="\n")
                doc_id = f"web-bible/{book.name}/{chapter}"
                yield Document(doc_id, text.strip(), "web-bible", _PARALLEL_BOOKS.get(book.name, doc_id))


def python_docs(sections: tuple[str, ...] = ("tutorial", "howto", "faq", "reference", "library")) -> Iterator[Document]:
    """Python 3.11 documentation sources, one document per page (Debian ``python3.11-doc``)."""
    if not PYTHON_DOCS.is_dir():
        raise InputError("the python-docs source needs Debian's python3.11-doc: apt-get install python3.11-doc")
    for section in sections:
        for path in sorted((PYTHON_DOCS / section).rglob("*.rst.txt")):
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not _RST_RULE.match(ln)]
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
            if len(text) > 200:
                rel = path.relative_to(PYTHON_DOCS).as_posix().removesuffix(".rst.txt")
                yield Document(f"python-docs/{rel}", text, f"python-docs/{section}")


def fortunes(per_document: int = 40) -> Iterator[Document]:
    """BSD fortune files (Debian ``fortunes``); ``per_document`` fortunes per document,
    one split group per file. Not redistributed: the quotations have many authors."""
    if not FORTUNES.is_dir():
        raise InputError("the fortunes source needs Debian's fortunes: apt-get install fortunes")
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or path.is_dir() or not (path.parent / f"{path.name}.dat").exists():
            continue
        items = [f.strip() for f in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        items = [f for f in items if f]
        for start in range(0, len(items), per_document):
            yield Document(
                f"fortunes/{path.name}/{start // per_document}",
                "\n\n".join(items[start : start + per_document]),
                "fortunes",
                f"fortunes/{path.name}",
            )


SOURCES: dict[str, Callable[[], Iterator[Document]]] = {
    "web-bible": web_bible,
    "python-docs": python_docs,
    "fortunes": fortunes,
}
REDISTRIBUTABLE = ("web-bible", "python-docs")


def build_corpus(source_names: list[str], max_chars_per_source: int | None = None) -> list[Document]:
    """Collect documents from the named sources, each capped at ``max_chars_per_source``."""
    unknown = [name for name in source_names if name not in SOURCES]
    if unknown:
        raise InputError(f"unknown corpus source(s) {unknown}; available: {sorted(SOURCES)}")
    documents: list[Document] = []
    for name in source_names:
        used = 0
        for doc in SOURCES[name]():
            if max_chars_per_source is not None and used + len(doc.text) > max_chars_per_source:
                break
            documents.append(doc)
            used += len(doc.text)
    return documents
