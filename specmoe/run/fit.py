"""``specmoe train``: fit a predictor on the train split (model selection on val) and save it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from specmoe.evaluation.evaluate import dataset_for
from specmoe.predictors.neural.base import TorchPredictor
from specmoe.predictors.registry import make_predictor
from specmoe.storage import atomic
from specmoe.storage.locks import DirectoryLock
from specmoe.traces.store import TraceStore
from specmoe.training.checkpoint import remove_incomplete_checkpoints


def fit_and_save(
    name: str,
    traces: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    split_seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    command: str = "",
    **overrides,
):
    store = TraceStore.open(traces)
    predictor = make_predictor(name, preset, **overrides)
    train = dataset_for(predictor, store, "train", split_seed)
    val = train.with_split("val")
    with DirectoryLock(out, "specmoe train") as lock:  # shared by the ranks of a torchrun job
        if lock.first:
            remove_incomplete_checkpoints(out)
        started = time.perf_counter()
        if isinstance(predictor, TorchPredictor):
            predictor.fit(train, val, out_dir=out, resume=resume, progress=progress)
        else:
            predictor.fit(train, val)
        seconds = time.perf_counter() - started
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return predictor, {}  # under torchrun, rank 0 alone writes the result
        out = predictor.save(out)
        info = {
            "predictor": name,
            "preset": preset,
            "params": predictor.get_params(),
            "traces": str(store.directory),
            "split_seed": split_seed,
            "fit_seconds": round(seconds, 2),
            "num_parameters": predictor.num_parameters(),
            "val_recall_at_k": round(predictor.score(val), 5),
            "command": command,
            "training": getattr(predictor, "training_summary_", None),
        }
        atomic.write_json(Path(out) / "train_info.json", info)
    return predictor, info
