"""Load any supported Hugging Face MoE checkpoint (hub id, local directory, or built-in name)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from specmoe.errors import InputError
from specmoe.models.base import MoEAdapter, MoELayer
from specmoe.models.builtin.specs import BUILTIN_SPECS
from specmoe.models.registry import adapter_for

SEQ2SEQ_FAMILIES = {"switch_transformers"}


@dataclass
class LoadedModel:
    """A model ready for recording: the module, its tokenizer, adapter and MoE layers."""

    model_id: str
    model: nn.Module
    tokenizer: object
    adapter: MoEAdapter
    layers: list[MoELayer]
    num_experts: int
    top_k: int
    model_type: str
    stacks: dict[str, int] = field(default_factory=dict)
    """MoE layer count per stack, in stack order."""

    def layers_of(self, stack: str) -> list[MoELayer]:
        return [layer for layer in self.layers if layer.stack == stack]


def resolve_model_path(name_or_path: str) -> str:
    """Built-in names map to the shipped checkpoint; anything else is passed through."""
    if name_or_path in BUILTIN_SPECS:
        path = BUILTIN_SPECS[name_or_path].path
        if not (path / "config.json").exists():
            raise InputError(
                f"built-in model {name_or_path!r} is missing its weights at {path}; "
                f"retrain it with: specmoe models train-builtin {name_or_path}"
            )
        return str(path)
    return name_or_path


def local_checkpoint(name_or_path: str) -> Path:
    """The local directory of a checkpoint: a built-in model's, a directory given, or a hub
    id's snapshot in the Hugging Face cache (fetched when online; with HF_HUB_OFFLINE=1 or no
    network, only what is cached)."""
    source = resolve_model_path(name_or_path)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 -- the hub raises many kinds; each means "not available here"
        raise InputError(
            f"{name_or_path!r} is not a local directory or a built-in model, and its files are not in the "
            f"Hugging Face cache ({type(exc).__name__}); download it, or give its local directory"
        ) from None


def load_config(name_or_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    source = resolve_model_path(name_or_path)
    local_config = Path(source) / "config.json"
    if local_config.is_file():  # check the family before transformers validates the rest
        try:
            model_type = json.loads(local_config.read_text()).get("model_type")
        except json.JSONDecodeError as exc:
            raise InputError(f"{local_config}: not valid JSON ({exc.msg})") from None
        adapter_for(str(model_type))
    elif not Path(source).exists():
        _check_hub_id(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError or its own validation errors
        hint = (
            ""
            if Path(source).exists()
            else (
                " It is not a built-in model name, not a local directory, and could not be fetched from the "
                f"Hugging Face hub (offline?). Built-in models: {', '.join(BUILTIN_SPECS)}."
            )
        )
        raise InputError(f"cannot load model config from {name_or_path!r}: {exc}.{hint}") from None


def _check_hub_id(name: str) -> None:
    """Offline first: a name that is neither built in nor a directory is a hub id, found in the
    Hugging Face cache or fetched; fail at once, not after the hub client's retries, when it
    is not cached and the hub cannot be reached."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    builtins = ", ".join(BUILTIN_SPECS)
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError:
        # Not a valid hub id either (an absolute path, "a/b/c", ".."): most likely a mistyped directory.
        raise InputError(
            f"{name!r}: no such directory, and not a Hugging Face hub id (ORG/NAME). Built-in models: {builtins}."
        ) from None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if not offline:
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
            return
        except OSError:
            pass
    raise InputError(
        f"{name!r} is not a local directory, not in the Hugging Face cache, and the hub "
        f"{'is switched off (HF_HUB_OFFLINE)' if offline else 'cannot be reached'}. Built-in models: {builtins}."
    )


def wrap_model(model_id: str, model: nn.Module, tokenizer=None) -> LoadedModel:
    """Attach an adapter to an already-built model (used by the loader and by tests)."""
    adapter = adapter_for(model.config.model_type)
    layers = adapter.moe_layers(model)
    stacks: dict[str, int] = {}
    for layer in layers:
        stacks[layer.stack] = stacks.get(layer.stack, 0) + 1
    return LoadedModel(
        model_id,
        model,
        tokenizer,
        adapter,
        layers,
        adapter.num_experts(model.config),
        adapter.top_k(model.config),
        model.config.model_type,
        stacks,
    )


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    device_map: str | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a checkpoint and its tokenizer; fails early, naming the supported families, if
    its ``model_type`` has no adapter. With ``device_map`` (see :mod:`specmoe.models.placement`)
    accelerate spreads the layers over devices and ``device`` is ignored."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    adapter_for(config.model_type)  # unsupported types fail here, before loading weights
    source = resolve_model_path(name_or_path)
    auto = AutoModelForSeq2SeqLM if config.model_type in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    placement = (
        {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder} if device_map else {}
    )
    try:
        model = auto.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **placement)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if device_map and "offload_folder" in str(exc):
            raise InputError(
                "the device map puts some layers on disk: give --offload-folder DIR (room for those weights) "
                "or a larger --max-memory"
            ) from None
        raise InputError(f"cannot load model weights or tokenizer from {name_or_path!r}: {exc}") from None
    if not device_map:
        model.to(device)
    model.eval()
    return wrap_model(name_or_path, model, tokenizer)


def expert_nbytes(model_id: str, dtype: str = "bfloat16", *, trust_remote_code: bool = False) -> int:
    """Bytes of one routed expert, from the model's config alone (built on the meta device)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = load_config(model_id, trust_remote_code=trust_remote_code)
    auto = AutoModelForSeq2SeqLM if config.model_type in SEQ2SEQ_FAMILIES else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    loaded = wrap_model(model_id, model)
    numel = sum(p.numel() for p in loaded.adapter.expert_parameters(loaded.layers[0], 0))
    return numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()
