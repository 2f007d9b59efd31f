"""The window stream: a long document is tokenised in pieces into the windows of the whole,
in bounded memory."""

from itertools import islice

from transformers import AutoTokenizer

from specmoe.corpus import documents
from specmoe.corpus.builtin import load_builtin_corpus
from specmoe.models.loading import resolve_model_path
from specmoe.traces.windows import plan_windows


def test_a_long_document_is_tokenised_piece_by_piece_into_the_windows_of_the_whole(monkeypatch, tmp_path):
    """Byte-level BPE (the built-in tokenizers, GPT-2/Llama-3/Qwen style): pieces cut before a
    word's space give exactly the whole document's tokens."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("olmoe-64e"))
    text = " ".join(d.text for d in load_builtin_corpus()[:40])
    (tmp_path / "long.txt").write_text(text)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(documents, "PIECE_CHARS", 997)
    windows = list(plan_windows([str(tmp_path / "long.txt")], tokenizer, 64))
    assert len(text) > 50 * 997
    head = 1 if tokenizer.bos_token_id is not None else 0
    assert [t for w in windows for t in w.token_ids[head:]] == whole
    assert all(len(w.token_ids) == 64 for w in windows[:-1])


def test_a_huge_single_line_document_reaches_the_tokenizer_in_bounded_pieces(monkeypatch, tmp_path):
    """Memory is bounded by the piece, not the document: the tokenizer never sees more than
    two pieces' worth of text, and a --max-tokens limit stops the reading early."""
    seen: list[int] = []

    class CountingTokenizer:
        bos_token_id = None

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return {"input_ids": [len(word) for word in text.split(" ")]}

    read: list[int] = []
    real_blocks = documents._read_text_blocks
    monkeypatch.setattr(
        documents, "_read_text_blocks", lambda path: (read.append(len(b)) or b for b in real_blocks(path))
    )
    monkeypatch.setattr(documents, "PIECE_CHARS", 4096)
    (tmp_path / "one-line.txt").write_text("word " * 400_000)  # 2 MB, no newline
    windows = list(islice(plan_windows([str(tmp_path / "one-line.txt")], CountingTokenizer(), 128), 20))
    assert len(windows) == 20 and max(seen) <= 2 * 4096
    assert sum(read) < 200_000  # characters read: the blocks it needed, not the 2 MB
