"""Where a model's weights go: one device, or accelerate's placement over several.

One device (``--device``) suits a model that fits it: under torchrun each process takes its
own GPU. A model larger than one device is spread layer by layer over the process's GPUs,
CPU memory and, last, disk (``--device-map auto``, accelerate's placement); the recording
hooks sit on the model's own modules, so they see routing wherever a layer runs. With
several processes on one node, each spreads over its own contiguous share of the GPUs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from specmoe.errors import InputError
from specmoe.torchrun import local_rank, local_world_size

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_placement(device: str, device_map: str | None, max_memory: str | None, offload_folder) -> None:
    """Reject bad combinations before anything is loaded."""
    if not _DEVICE.match(device):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise InputError(f"unknown --device-map {device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise InputError("--max-memory and --offload-folder apply to --device-map; add --device-map auto")
    if device_map is not None and device != "auto":
        raise InputError("give either --device (one device) or --device-map (spread over several), not both")
    if max_memory is not None:
        parse_max_memory(max_memory, gpus=list(range(torch.cuda.device_count())))


def resolve_device(device: str) -> str:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) if there is one, else cpu."""
    if device == "auto":
        return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank()}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is visible")
    return device


def process_gpus(gpu_count: int, rank: int, ranks_per_node: int) -> list[int]:
    """This process's contiguous share of the node's visible GPUs."""
    if gpu_count == 0:
        return []
    share = gpu_count // ranks_per_node
    if share == 0:
        raise InputError(
            f"{ranks_per_node} processes per node share {gpu_count} GPUs; --device-map needs at least one "
            "GPU per process (start fewer processes per node)"
        )
    return list(range(rank * share, (rank + 1) * share))


def parse_max_memory(text: str, gpus: list[int]) -> dict[int | str, int]:
    """``gpu=70GiB,cpu=200GiB`` or ``0=70GiB,1=40GiB,cpu=1TB`` -> accelerate's ``max_memory``
    in bytes; ``gpu`` sets every GPU of this process, integers name visible GPUs."""
    budget: dict[int | str, int] = {}
    for item in text.split(","):
        key, sep, size = item.strip().partition("=")
        bytes_ = _size(size.strip(), item) if sep else None
        if bytes_ is None:
            raise InputError(f"--max-memory expects device=size items such as gpu=70GiB,cpu=200GiB; got {item!r}")
        if key == "gpu":
            budget.update(dict.fromkeys(gpus, bytes_))
        elif key == "cpu":
            budget["cpu"] = bytes_
        elif key.isdigit() and int(key) in gpus:
            budget[int(key)] = bytes_
        else:
            raise InputError(
                f"--max-memory: unknown device {key!r}; use cpu, gpu (each GPU of this process) or one of "
                f"this process's GPU indices {gpus}"
            )
    return budget


def _size(text: str, item: str) -> int | None:
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(int(text) if text.isdigit() else text)
    except ValueError:
        raise InputError(f"--max-memory {item!r}: size must be bytes or a number with a unit (70GiB, 500MB)") from None


def _default_budget(gpus: list[int], ranks_per_node: int) -> dict[int | str, int]:
    """accelerate's default (free memory of every device), cut to this process's GPUs and
    its share of the node's CPU memory."""
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    budget: dict[int | str, int] = {gpu: free[gpu] for gpu in gpus if gpu in free}
    budget["cpu"] = free["cpu"] // ranks_per_node
    return budget


def load_kwargs(device: str, device_map: str | None, max_memory: str | None, offload_folder: str | Path | None) -> dict:
    """Keyword arguments for :func:`specmoe.models.loading.load_model`."""
    check_placement(device, device_map, max_memory, offload_folder)
    if device_map is None:
        return {"device": resolve_device(device)}
    ranks_per_node = local_world_size()
    gpus = process_gpus(torch.cuda.device_count(), local_rank(), ranks_per_node)
    budget = parse_max_memory(max_memory, gpus) if max_memory else None
    if budget is None and ranks_per_node > 1:
        budget = _default_budget(gpus, ranks_per_node)
    return {
        "device_map": device_map,
        "max_memory": budget,
        "offload_folder": str(offload_folder) if offload_folder else None,
    }


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a batch's token ids go: the input embedding's device. Under accelerate's
    placement a module kept on disk has its weights on 'meta' and its hook moves the
    inputs itself; CPU is then as good a start as any."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device
