"""Per-epoch checkpoints without pickle: tensors in safetensors, everything else in JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: Path,
    epoch: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    best: dict[str, torch.Tensor],
) -> Path:
    directory = Path(out_dir) / CHECKPOINTS / f"epoch-{epoch:04d}"
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save(module.state_dict(), directory / "model.safetensors")
    _atomic_save(best, directory / "best.safetensors")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    _atomic_save(tensors, directory / "optimizer.safetensors")
    meta = {"state": state, "param_groups": opt["param_groups"], "scalars": scalars}
    tmp = directory / "trainer.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, directory / "trainer.json")  # written last: its presence marks a complete checkpoint
    return directory


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    complete = sorted(p for p in root.glob("epoch-*") if (p / "trainer.json").is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(
    directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore module and optimizer; returns (trainer state, best weights so far)."""
    module.load_state_dict(load_file(directory / "model.safetensors"))
    meta = json.loads((directory / "trainer.json").read_text())
    per_param: dict[int, dict] = {}
    for key, value in load_file(directory / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    return meta["state"], load_file(directory / "best.safetensors")
