"""``specmoe traces merge``: stores collected apart read like one collection over their texts."""

import json

import numpy as np
import pytest

from specmoe.errors import InputError
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.merge import merge_stores
from specmoe.traces.store import TraceStore


def _corpus(path, first, count):
    docs = [
        {"id": f"doc{i}", "text": f"Document {i}. " + "The lazy dog sleeps while the fox runs. " * (3 + i)}
        for i in range(first, first + count)
    ]
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return path


@pytest.fixture(scope="module")
def parts(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    texts = [_corpus(root / "a.jsonl", 0, 3), _corpus(root / "b.jsonl", 3, 4)]

    def run(name, sources, **overrides):
        settings = {"seq_len": 16, "windows_per_shard": 3, "save_router_inputs": True, **overrides}
        model = str(tiny_checkpoints["olmoe"])
        texts = [str(t) for t in sources]
        return collect(CollectConfig(model=model, texts=texts, out=root / name, progress=False, **settings))

    return {
        "a": run("a", texts[:1]),
        "b": run("b", texts[1:]),
        "both": run("both", texts),
        "b-long": run("b-long", texts[1:], seq_len=32),
    }


def _rows(store: TraceStore) -> dict[str, np.ndarray]:
    shards = list(store.iter_shards())
    rows = {name: np.concatenate([getattr(s, name) for s in shards]) for name in ("doc_ids", "windows", "token_ids")}
    rows["expert_ids"] = np.concatenate([s.expert_ids for s in shards])
    rows["router_input"] = np.concatenate([store.hidden_states(i).numpy() for i in range(len(store.manifest.shards))])
    return rows


def test_a_merge_reads_like_one_collection_over_both_texts(parts, tmp_path):
    merged = merge_stores([parts["a"].directory, parts["b"].directory], tmp_path / "m")
    assert merged.manifest.complete
    assert merged.manifest.num_tokens == parts["a"].manifest.num_tokens + parts["b"].manifest.num_tokens
    ours, reference = _rows(TraceStore.open(tmp_path / "m", verify_checksums=True)), _rows(parts["both"])
    for name, values in reference.items():
        assert np.array_equal(ours[name], values), name
    sources = merged.manifest.collection.merged_from
    assert [s.fingerprint for s in sources] == [parts[n].manifest.collection.fingerprint for n in ("a", "b")]
    assert sources[1].window_offset == int(_rows(parts["a"])["windows"].max()) + 1


def test_an_interrupted_merge_resumes_to_the_same_store(parts, tmp_path):
    inputs = [parts["a"].directory, parts["b"].directory]
    merge_stores(inputs, tmp_path / "whole")
    partial = merge_stores(inputs, tmp_path / "m")
    partial.manifest.shards = partial.manifest.shards[:2]
    partial.manifest.num_tokens = sum(s.num_tokens for s in partial.manifest.shards)
    partial.manifest.complete = False
    partial.manifest.save(tmp_path / "m")
    (tmp_path / "m" / "shard-00002.parquet").write_bytes(b"half a shard")
    merge_stores(inputs, tmp_path / "m")
    assert (tmp_path / "m" / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json").read_text()


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("a", "b-long"), "seq_len differs"),
        (("a", "both"), "both hold document 'doc"),
        (("a",), "at least two stores"),
    ],
)
def test_stores_that_do_not_belong_together_are_refused(parts, tmp_path, names, message):
    with pytest.raises(InputError, match=message):
        merge_stores([parts[n].directory for n in names], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_an_unfinished_store_is_not_merged(parts, tmp_path):
    import shutil

    shutil.copytree(parts["b"].directory, tmp_path / "b")
    manifest = TraceStore.open(tmp_path / "b").manifest
    manifest.complete = False
    manifest.save(tmp_path / "b")
    with pytest.raises(InputError, match="not complete"):
        merge_stores([parts["a"].directory, tmp_path / "b"], tmp_path / "m")
