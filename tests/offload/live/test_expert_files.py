import gc

import torch

from specmoe.offload.live import expert_files
from specmoe.offload.live.expert_files import ALIGN, ExpertFiles, ReadBuffers


def _experts(layers=2, experts=3):
    generator = torch.Generator().manual_seed(0)
    return {
        layer: [
            [torch.randn(8, 4, generator=generator), torch.randn(4, 8, generator=generator)] for _ in range(experts)
        ]
        for layer in range(layers)
    }


def test_reads_return_the_written_experts(tmp_path):
    written = _experts()
    files = ExpertFiles.write(tmp_path, written)
    for layer, experts in written.items():
        for e, tensors in enumerate(experts):
            for got, want in zip(files.read(layer, e), tensors, strict=True):
                assert torch.equal(got, want)


def test_a_read_in_chunks_calls_back_between_them_and_reads_the_same_bytes(tmp_path, monkeypatch):
    written = {0: [[torch.randn(1000, 9), torch.randn(9, 1000)] for _ in range(3)]}  # 72 kB: 5 chunks of 16 KiB
    files = ExpertFiles.write(tmp_path, written)
    monkeypatch.setattr(expert_files, "CHUNK", 4 * ALIGN)
    calls = []
    got = files.read(0, 2, between_chunks=lambda: calls.append(1))
    stride = files.layout[0].stride
    assert len(calls) == -(-stride // (4 * ALIGN)) - 1
    for tensor, want in zip(got, written[0][2], strict=True):
        assert torch.equal(tensor, want)


def test_a_buffer_is_reused_only_after_every_tensor_viewing_it_is_gone(tmp_path):
    written = _experts()
    files = ExpertFiles.write(tmp_path, written)
    first = files.read(0, 0)
    addresses = {first[0].data_ptr()}
    down = first[1]  # one of the expert's tensors outlives the rest
    del first
    gc.collect()
    second = files.read(0, 1)
    assert len(files.buffers) == 2, "a buffer still viewed by a live tensor was lent again"
    assert torch.equal(down, written[0][0][1]), "a later read overwrote a live expert"
    addresses.add(second[0].data_ptr())
    del second, down
    gc.collect()
    third = files.read(1, 2)
    assert len(files.buffers) == 2
    assert third[0].data_ptr() in addresses, "a buffer no tensor viewed was not reused"
    for got, want in zip(third, written[1][2], strict=True):
        assert torch.equal(got, want)


def test_buffers_are_aligned_and_sized_as_asked():
    buffers = ReadBuffers()
    held = [buffers.take(2 * ALIGN) for _ in range(3)] + [buffers.take(ALIGN)]
    assert [t.numel() for t in held] == [2 * ALIGN] * 3 + [ALIGN]
    assert all(t.data_ptr() % ALIGN == 0 for t in held)
    assert len({t.data_ptr() for t in held}) == 4


def test_reserved_buffers_serve_reads_without_growing():
    buffers = ReadBuffers()
    buffers.reserve(ALIGN, 3)
    assert len(buffers) == 3
    held = [buffers.take(ALIGN) for _ in range(3)]
    assert len(buffers) == 3
    held.append(buffers.take(ALIGN))
    assert len(buffers) == 4
