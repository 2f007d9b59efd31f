import json

import pytest

from tests.tiny_models import save_tiny_checkpoint
from tests.tiny_runs import tiny_run_config, write_run_corpus


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Expert stores and other cached files go to the session's temporary directory, never
    the user's ~/.cache/specmoe."""
    import os

    os.environ["SPECMOE_CACHE"] = str(tmp_path_factory.mktemp("specmoe-cache"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the hub: a missing model must fail fast, not wait on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # progress bars would bury a failure's output


@pytest.fixture(scope="session")
def finished_run(tiny_checkpoints, tmp_path_factory):
    """A complete ``specmoe run`` of the default config, shrunk onto the tiny OLMoE model."""
    from specmoe.run.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("run")
    corpus = write_run_corpus(root / "corpus.jsonl")
    config = tiny_run_config(None, tiny_checkpoints["olmoe"], corpus)
    run_pipeline(config, root / "out", command="specmoe run (test)")
    return root / "out", config


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 600 KiB tmpfs mounted for the test (needs root with CAP_SYS_ADMIN; skipped otherwise)."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
