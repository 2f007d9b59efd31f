import json

import pytest

from tests.tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Local checkpoint directories of tiny models, keyed by model_type."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {mt: save_tiny_checkpoint(mt, root / mt) for mt in ("olmoe", "switch_transformers")}


@pytest.fixture
def small_corpus(tmp_path):
    """A JSONL corpus of a few short documents."""
    path = tmp_path / "corpus.jsonl"
    docs = [
        {"id": f"doc{i}", "text": f"Document {i}. " + "The lazy dog sleeps while the fox runs. " * (3 + i)}
        for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the hub: a missing model must fail fast, not wait on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
