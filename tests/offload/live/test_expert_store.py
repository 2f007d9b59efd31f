"""The expert store: written once, reused without conversion, rebuilt when stale or
half-written, never used when its bytes are corrupt; every failure one line naming the file."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from specmoe.errors import CorruptStoreError, InputError
from specmoe.models.offloaded import load_offloaded
from specmoe.offload.live.expert_store import default_store, open_store, prepare_store
from tests.tiny_models import save_tiny_checkpoint


def _quiet(_message):
    pass


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMOE_CACHE", str(tmp_path / "cache"))
    return load_offloaded(str(save_tiny_checkpoint("olmoe", tmp_path / "ckpt")), progress=False)


def test_a_store_is_written_once_in_the_cache_and_reused(model):
    first = prepare_store(model, progress=False, log=_quiet)
    assert (
        first.directory == default_store(model)
        and first.directory.parent == Path(os.environ["SPECMOE_CACHE"]) / "experts"
    )
    stamp = (first.directory / "layer-0000.bin").stat().st_mtime_ns
    again = prepare_store(model, progress=False, log=_quiet)
    assert (again.directory / "layer-0000.bin").stat().st_mtime_ns == stamp, "rewritten"
    for e in (0, 7):
        assert all(torch.equal(a, b) for a, b in zip(again.read(1, e), model.expert_tensors(1, e), strict=True))


def test_a_half_written_or_stale_store_is_rebuilt_not_used(model, tmp_path):
    store = prepare_store(model, tmp_path / "s", progress=False, log=_quiet).directory
    (store / "experts.json").unlink()  # killed before the index was written
    assert open_store(store, model) is None
    messages = []
    prepare_store(model, store, progress=False, log=messages.append)
    assert "stale or unfinished" in messages[0] and open_store(store, model) is not None
    with (store / "layer-0001.bin").open("r+b") as handle:  # cut short
        handle.truncate(100)
    assert open_store(store, model) is None
    other = load_offloaded(str(model.checkpoint.directory), dtype="bfloat16", progress=False)
    assert open_store(prepare_store(model, store, progress=False, log=_quiet).directory, other) is None  # other dtype
    (store.with_name("s.partial")).mkdir()  # a prepare killed midway leaves this; the next one starts over
    shutil.rmtree(store)
    prepare_store(model, store, progress=False, log=_quiet)
    assert not store.with_name("s.partial").exists()


def test_corrupt_expert_bytes_are_an_error_naming_the_file(model, tmp_path):
    store = prepare_store(model, tmp_path / "s", progress=False, log=_quiet)
    layout = store.layout[0]
    with (store.directory / "layer-0000.bin").open("r+b") as handle:
        handle.seek(3 * layout.stride + 10)
        byte = handle.read(1)
        handle.seek(3 * layout.stride + 10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    reopened = open_store(store.directory, model)
    reopened.read(0, 2)  # the others are fine
    with pytest.raises(CorruptStoreError, match=r"layer-0000.bin: expert 3's bytes do not match their checksum"):
        reopened.read(0, 3)
    os.remove(store.directory / "layer-0001.bin")
    with pytest.raises(CorruptStoreError, match="layer-0001.bin: an expert file of the store is missing"):
        store.__class__(store.directory).read(1, 0)


def test_a_disk_without_room_is_refused_before_writing(model, tmp_path, monkeypatch):
    from specmoe.offload.live import expert_store

    monkeypatch.setattr(expert_store.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(InputError, match="needs 0.0 GiB and .* has 0.0 GiB free; free some space or give another"):
        prepare_store(model, tmp_path / "s", progress=False, log=_quiet)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_a_disk_that_fills_while_writing_leaves_nothing_behind(model, tmp_path, monkeypatch):
    import errno

    from specmoe.offload.live import expert_files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(expert_files.os, "fsync", full)
    with pytest.raises(InputError, match="filled while writing the expert store"):
        prepare_store(model, tmp_path / "s", progress=False, log=_quiet)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
