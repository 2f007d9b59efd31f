import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from specmoe.corpus.builtin import load_builtin_corpus
from specmoe.corpus.documents import Document, read_documents, text_pieces, write_jsonl_gz
from specmoe.errors import InputError


def test_jsonl_parquet_and_text_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "hello"}\n\n{"text": "world"}\n')
    docs = list(read_documents(tmp_path / "a.jsonl"))
    assert [d.doc_id for d in docs] == ["x", "a.jsonl:3"] and docs[1].text == "world"
    pq.write_table(pa.table({"id": ["p", "q"], "text": ["one", "two"]}), tmp_path / "b.parquet")
    assert [(d.doc_id, d.text) for d in read_documents(tmp_path / "b.parquet")] == [("p", "one"), ("q", "two")]
    (tmp_path / "c.txt").write_text("plain text")
    assert [d.doc_id for d in read_documents(tmp_path / "c.txt")] == ["c.txt"]


def test_bad_inputs_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match="bad.jsonl:2: not valid JSON"):
        list(read_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "nokey.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match='string "text" field'):
        list(read_documents(tmp_path / "nokey.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "n.parquet")
    with pytest.raises(InputError, match='no "text" column'):
        list(read_documents(tmp_path / "n.parquet"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="bin.txt: not UTF-8"):
        [list(d.blocks()) for d in read_documents(tmp_path / "bin.txt")]
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="bin.jsonl:2: not UTF-8"):
        list(read_documents(tmp_path / "bin.jsonl"))


def test_jsonl_gz_round_trip_is_byte_stable(tmp_path):
    docs = [Document("a", "text one", "s", "g"), Document("b", "text two")]
    write_jsonl_gz(docs, tmp_path / "x.jsonl.gz")
    first = (tmp_path / "x.jsonl.gz").read_bytes()
    write_jsonl_gz(docs, tmp_path / "x.jsonl.gz")
    assert (tmp_path / "x.jsonl.gz").read_bytes() == first
    assert list(read_documents(tmp_path / "x.jsonl.gz")) == docs


def test_builtin_corpus_has_two_domains_and_unique_ids():
    docs = load_builtin_corpus()
    assert len({d.doc_id for d in docs}) == len(docs) > 500
    assert {d.source.split("/")[0] for d in docs} == {"web-bible", "python-docs"}
    # parallel books share one split group
    groups = {d.group for d in docs if d.doc_id.startswith(("web-bible/I Samuel/", "web-bible/II Kings/"))}
    assert groups == {"samuel-kings-chronicles"}


def test_text_pieces_rejoin_to_the_text_and_respect_the_limit():
    text = "alpha beta  gamma\n\ndelta " * 50 + "x" * 300 + " omega"
    pieces = list(text_pieces(iter([text[:100], text[100:]]), 64))
    assert "".join(pieces) == text
    assert all(len(p) <= 64 for p in pieces)
    assert all(p.startswith((" ", "x")) or p is pieces[0] for p in pieces if p.strip())
