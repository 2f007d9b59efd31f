"""The deterministic stream of windows a collection runs the model over.

Documents in input order, each cut into ``seq_len``-token windows that never cross a document
boundary. Documents are read and tokenised piece by piece (:func:`text_pieces`), so memory is
bounded by a piece and a window however long a document is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from specmoe.corpus.builtin import resolve_text_source
from specmoe.corpus.documents import read_documents, text_pieces


@dataclass
class Window:
    index: int
    doc_id: str
    doc_group: str
    """Split key: documents of one group (near-duplicates, parallel texts) share a split."""
    token_ids: list[int] = field(repr=False)


def plan_windows(texts: list[str], tokenizer, seq_len: int) -> Iterator[Window]:
    """Deterministic window stream. A BOS token, when the tokenizer has one, starts every window.
    (docs/guarantees.md says where pieces are cut and why the tokens are the whole document's.)"""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None else []
    body = seq_len - len(head)
    index = 0
    for text in texts:
        for doc in read_documents(resolve_text_source(text)):
            pending: list[int] = []
            for piece in text_pieces(doc.blocks()):
                pending += tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                while len(pending) > body:  # keep a last, possibly partial, window for the document's end
                    yield Window(index, doc.doc_id, doc.split_key, head + pending[:body])
                    pending = pending[body:]
                    index += 1
            if pending:
                yield Window(index, doc.doc_id, doc.split_key, head + pending)
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
