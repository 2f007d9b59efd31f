"""Training loop for torch predictors: AdamW, warmup + cosine, gradient clipping, early
stopping on validation loss, a checkpoint each epoch, resume, and a NaN/Inf guard.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the module is wrapped in DistributedDataParallel and
each rank reads every ``world_size``-th batch; nothing else changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from specmoe.errors import SpecmoeError
from specmoe.storage import atomic
from specmoe.torchrun import init_process_group
from specmoe.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from specmoe.training.logging import MetricsLogger


class NonFiniteLossError(SpecmoeError):
    """Training produced NaN/Inf twice in a row, even after rolling back."""


def training_fingerprint(predictor, train, world: int) -> str:
    """What decides a training run's result: the predictor's settings, the traces, the split
    and the number of ranks (each reads every world-th batch). A checkpoint carries it."""
    manifest = train.store.manifest
    identity = {
        "predictor": predictor.name,
        "params": predictor.get_params(),
        "traces": [manifest.collection.fingerprint, manifest.num_tokens, len(manifest.shards)],
        "split_seed": train.seed,
        "world_size": world,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(predictor, data, *, shuffle: bool, seed: int, rank: int, world: int, limit: int | None):
    count = 0
    for i, batch in enumerate(data.iter_batches(predictor.batch_size, shuffle=shuffle, seed=seed)):
        if i % world != rank:
            continue
        if limit is not None and count >= limit:
            return
        count += 1
        yield batch


class StepLoss(torch.nn.Module):
    """One training step's loss, averaged over every source layer, as a single forward call
    (what DistributedDataParallel needs to synchronise gradients once per step)."""

    def __init__(self, predictor):
        super().__init__()
        self.inner = predictor.module_
        self._predictor = (predictor,)

    def forward(self, batch) -> torch.Tensor:
        predictor = self._predictor[0]
        layers = predictor.source_layers()
        return sum(predictor.loss(batch, layer) for layer in layers) / len(layers)


def validation_loss(predictor, val, max_batches: int | None = None) -> float:
    predictor.module_.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(val.iter_batches(predictor.batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            total += float(StepLoss(predictor)(batch))
            count += 1
    return total / max(count, 1)


def train_predictor(
    predictor, train, val=None, *, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True
):
    """Fit a :class:`TorchPredictor`; returns it with the best-on-validation weights."""
    rank, world = init_process_group()
    out_dir = Path(out_dir) if out_dir else None
    predictor.init_module(train.num_layers, train.num_experts, train.top_k)
    step_loss = StepLoss(predictor)
    if world > 1:
        step_loss = torch.nn.parallel.DistributedDataParallel(step_loss, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(predictor.module_.parameters(), lr=predictor.lr, weight_decay=predictor.weight_decay)
    # Every rank must take the same number of steps, or DDP's gradient sync deadlocks.
    batches_per_rank = max(1, sum(1 for _ in train.iter_batches(predictor.batch_size)) // world)
    steps_per_epoch = min(predictor.max_steps_per_epoch or batches_per_rank, batches_per_rank)
    total = steps_per_epoch * predictor.epochs
    warmup = int(predictor.warmup_fraction * total)
    state = {
        "epoch": 0,
        "step": 0,
        "best_val": float("inf"),
        "bad_epochs": 0,
        "best_epoch": -1,
        "non_finite_in_row": 0,
    }
    good = {k: v.detach().clone() for k, v in predictor.module_.state_dict().items()}
    best = good
    fingerprint = training_fingerprint(predictor, train, world)
    if resume and out_dir and (ckpt := latest_checkpoint(out_dir)):
        state, best = load_checkpoint(ckpt, predictor.module_, optimizer, fingerprint)
        good = {k: v.detach().clone() for k, v in predictor.module_.state_dict().items()}
    logger = MetricsLogger(out_dir if rank == 0 else None)
    for epoch in range(state["epoch"], predictor.epochs):
        predictor.module_.train()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{predictor.name} epoch {epoch + 1}/{predictor.epochs}",
            disable=not progress or rank != 0,
            unit="step",
        )
        started, epoch_loss, epoch_steps = time.perf_counter(), 0.0, 0
        for batch in _batches(
            predictor, train, shuffle=True, seed=predictor.seed + epoch, rank=rank, world=world, limit=steps_per_epoch
        ):
            for group in optimizer.param_groups:
                group["lr"] = predictor.lr * _lr_factor(state["step"], total, warmup)
            loss = step_loss(batch)
            if not torch.isfinite(loss):
                state["non_finite_in_row"] += 1
                if state["non_finite_in_row"] >= 2:
                    raise NonFiniteLossError(
                        f"{predictor.name}: loss is {loss.item()} at step {state['step']} again after rolling back; "
                        "lower --lr or check the traces"
                    )
                predictor.module_.load_state_dict(good)  # roll back to the last finite step
                optimizer.state.clear()
                logger.log({"event": "rollback", "step": state["step"], "loss": str(loss.item())})
                continue
            state["non_finite_in_row"] = 0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(predictor.module_.parameters(), predictor.grad_clip)
            optimizer.step()
            state["step"] += 1
            epoch_loss += loss.item()
            epoch_steps += 1
            if state["step"] % 50 == 0:
                good = {k: v.detach().clone() for k, v in predictor.module_.state_dict().items()}
                logger.log({"step": state["step"], "train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        val_loss = (
            validation_loss(predictor, val, max_batches=50) if val is not None else epoch_loss / max(epoch_steps, 1)
        )
        improved = val_loss < state["best_val"] - 1e-4
        if improved:
            state.update(best_val=val_loss, bad_epochs=0, best_epoch=epoch)
            best = {k: v.detach().clone() for k, v in predictor.module_.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        # The rollback point moves to each epoch's end, where a resumed run starts from too.
        good = {k: v.detach().clone() for k, v in predictor.module_.state_dict().items()}
        logger.log(
            {
                "epoch": epoch + 1,
                "step": state["step"],
                "train_loss": epoch_loss / max(epoch_steps, 1),
                "val_loss": val_loss,
                "seconds": round(time.perf_counter() - started, 2),
                "best": improved,
            }
        )
        if out_dir and rank == 0:
            save_checkpoint(out_dir, epoch + 1, predictor.module_, optimizer, state, best, fingerprint)
        if state["bad_epochs"] >= predictor.patience:
            logger.log({"event": "early_stop", "epoch": epoch + 1, "best_epoch": state["best_epoch"] + 1})
            break
    predictor.module_.load_state_dict(best)
    predictor.module_.eval()
    predictor.training_summary_ = {
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"] + 1,
        "best_val_loss": state["best_val"],
        "steps": state["step"],
    }
    logger.close()
    if out_dir and rank == 0:
        atomic.write_json(out_dir / "training_summary.json", predictor.training_summary_)
    return predictor
