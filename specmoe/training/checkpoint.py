"""Per-epoch checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds what an uninterrupted run would carry into the next epoch: weights, best
weights, optimizer state, the trainer's counters and every random generator's state, so a
resumed run equals one that was never stopped. ``trainer.json``, written last, marks the
checkpoint complete and records the SHA-256 of each tensor file (checked on load) and the
fingerprint of the settings and traces it was made with (a resume under others is refused).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from specmoe.errors import CorruptDataError, InputError
from specmoe.storage import atomic
from specmoe.storage.integrity import read_verified, sha256_file
from specmoe.storage.paths import remove_inside

CHECKPOINTS = "checkpoints"
TRAINER_FILE = "trainer.json"
TENSOR_FILES = ("model", "best", "optimizer", "rng")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    with atomic.atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    return sha256_file(path)


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator training draws from: torch (CPU and each GPU) as tensors, numpy's and
    Python's global ones as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    python = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [python[0], list(python[1]), python[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    out_dir: Path,
    epoch: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    best: dict[str, torch.Tensor],
    fingerprint: str,
) -> Path:
    directory = Path(out_dir) / CHECKPOINTS / f"epoch-{epoch:04d}"
    directory.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    rng_tensors, rng_meta = rng_state()
    contents = {"model": module.state_dict(), "best": best, "optimizer": tensors, "rng": rng_tensors}
    sha256 = {name: _save_tensors(contents[name], directory / f"{name}.safetensors") for name in TENSOR_FILES}
    meta = {
        "state": state,
        "param_groups": opt["param_groups"],
        "scalars": scalars,
        "rng": rng_meta,
        "fingerprint": fingerprint,
        "sha256": sha256,
    }
    atomic.write_json(directory / TRAINER_FILE, meta)  # last: its presence marks a complete checkpoint
    return directory


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    complete = sorted(p for p in root.glob("epoch-*") if (p / TRAINER_FILE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint directories a kill left without ``trainer.json``, and stray temporaries."""
    root = Path(out_dir) / CHECKPOINTS
    removed = atomic.remove_temporaries(out_dir)
    for directory in sorted(root.glob("epoch-*")) if root.is_dir() else []:
        if not (directory / TRAINER_FILE).is_file():
            remove_inside(root, directory)
            removed.append(directory)
    return removed


def load_checkpoint(
    directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore module, optimizer and random generators; returns (trainer state, best weights)."""
    remedy = f"delete {directory} to resume from the epoch before it, or train again without --resume"
    try:
        meta = json.loads((directory / TRAINER_FILE).read_text())
        files = {name: meta["sha256"][name] for name in TENSOR_FILES}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptDataError(f"{directory / TRAINER_FILE}: not a readable checkpoint record ({exc}); {remedy}") from None
    if meta.get("fingerprint") != fingerprint:
        raise InputError(
            f"the checkpoint in {directory} was made with other settings or traces than this run "
            f"(fingerprint {meta.get('fingerprint')}, this run {fingerprint}); train without --resume, "
            "or with the settings it was made with, or choose another --out"
        )
    tensors = {}
    for name, sha256 in files.items():
        data = read_verified(directory / f"{name}.safetensors", sha256, remedy=remedy)
        try:
            tensors[name] = load(data)
        except (SafetensorError, ValueError) as exc:
            raise CorruptDataError(f"{directory / name}.safetensors: cannot decode ({exc}); {remedy}") from None
    try:
        module.load_state_dict(tensors["model"])
        per_param: dict[int, dict] = {}
        for key, value in tensors["optimizer"].items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        for key, value in meta["scalars"].items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
        set_rng_state(tensors["rng"], meta["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CorruptDataError(f"{directory}: checkpoint does not fit this predictor ({exc}); {remedy}") from None
    return meta["state"], tensors["best"]
