"""The model card of a run: what the model is, how big, how it was trained, what it stands in
for. Facts come from the checkpoint's own files (``config.json``, the safetensors headers,
a built-in model's ``training.json``) and the built-in specs; what they do not say is said
to be unknown, never guessed. Nothing is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

from specmoe.errors import SpecmoeError
from specmoe.models.builtin.specs import BUILTIN_SPECS
from specmoe.models.checkpoint import SafetensorsCheckpoint

OBJECTIVES = {"span_corruption": "T5 span corruption", "causal_lm": "next-token prediction"}


def _local_directory(model_id: str) -> Path | None:
    """The checkpoint's directory on this machine (built in, given, or in the Hugging Face
    cache), or None."""
    if model_id in BUILTIN_SPECS:
        return BUILTIN_SPECS[model_id].path
    if Path(model_id).is_dir():
        return Path(model_id)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 -- not a hub id either: nothing cached to read
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _parameters(directory: Path) -> int | None:
    try:
        checkpoint = SafetensorsCheckpoint(directory)
    except (SpecmoeError, OSError, ValueError):
        return None
    return sum(math.prod(entry.shape) for entry in checkpoint.entries.values())


def _training(model_id: str, directory: Path | None) -> str:
    spec = BUILTIN_SPECS.get(model_id)
    record_path = directory / "training.json" if directory else None
    if spec is None:
        if Path(model_id).is_dir():
            return "a local checkpoint; how it was trained is not recorded with it"
        return "a published checkpoint, trained by its authors (not here)"
    if record_path is None or not record_path.is_file():
        return f"trained here by `specmoe models train-builtin {model_id}` ({OBJECTIVES[spec.objective]})"
    record = json.loads(record_path.read_text())
    settings = record["settings"]
    return (
        f"trained here on the shipped corpus ({record['num_documents']:,} documents) by `{record['command']}`: "
        f"{OBJECTIVES[spec.objective]}, {record['steps']:,} steps of {settings['batch_size']} x "
        f"{settings['seq_len']} tokens ({record['tokens_seen']:,} tokens), AdamW lr {settings['lr']}, "
        f"{record['seconds']:,.0f} s on {settings['threads']} CPU threads; final batch loss {record['final_loss']}"
    )


def model_card(model_id: str, traces: dict) -> dict:
    """The card of ``model_id`` whose traces ``traces`` (``traces.json``) describe."""
    directory = _local_directory(model_id)
    config_path = directory / "config.json" if directory else None
    config = json.loads(config_path.read_text()) if config_path and config_path.is_file() else {}
    spec = BUILTIN_SPECS.get(model_id)
    layers = config.get("num_hidden_layers", config.get("num_layers"))
    return {
        "name": model_id,
        "family": traces["model_type"],
        "architecture": (config.get("architectures") or [None])[0],
        "description": spec.description if spec else None,
        "layers": {
            "all": layers,
            "decoder": config.get("num_decoder_layers"),  # encoder-decoder models only
            "moe_by_stack": traces.get("stacks", {}),
        },
        "hidden_size": config.get("hidden_size", config.get("d_model")),
        "num_experts": traces["num_experts"],
        "top_k": traces["top_k"],
        "parameters": _parameters(directory) if directory else None,
        "trained": _training(model_id, directory),
        "stands_in_for": spec.stands_in_for if spec else None,
    }


def card_rows(card: dict) -> list[tuple[str, str]]:
    """The card as (field, text) rows, for the HTML and Markdown reports alike."""
    layers = card["layers"]
    moe = ", ".join(f"{count} {stack}" for stack, count in layers["moe_by_stack"].items())
    if layers["all"] is None:
        depth = "unknown (no config.json here)"
    elif layers["decoder"] is not None:
        depth = f"{layers['all']} encoder + {layers['decoder']} decoder"
    else:
        depth = str(layers["all"])
    rows = [
        ("model", card["name"] + (f": {card['description']}" if card["description"] else "")),
        ("family", card["family"] + (f" ({card['architecture']})" if card["architecture"] else "")),
        ("layers", depth + (f"; MoE layers: {moe}" if moe else "")),
        ("experts", f"{card['num_experts']} per MoE layer, top-{card['top_k']} per token"),
        ("hidden size", "unknown" if card["hidden_size"] is None else str(card["hidden_size"])),
        (
            "parameters",
            "unknown (checkpoint not on this machine)"
            if card["parameters"] is None
            else f"{card['parameters'] / 1e6:.1f}M ({card['parameters']:,})",
        ),
        ("trained", card["trained"]),
    ]
    if card["stands_in_for"]:
        rows.append(("stands in for", card["stands_in_for"]))
    return rows
