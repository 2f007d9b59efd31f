"""The estimator API every predictor follows (scikit-learn style).

``__init__`` stores keyword arguments only; ``fit`` learns state into attributes ending in
``_``; ``predict_proba(context)`` returns scores over experts for horizons 1..H; ``score`` is
higher-is-better (mean recall@k over horizons); ``save`` / ``load`` use safetensors + JSON.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Hashable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from specmoe.errors import CorruptDataError, InputError, storage_error
from specmoe.predictors.data import Context, TraceDataset
from specmoe.predictors.params import check_params
from specmoe.storage import atomic
from specmoe.storage.integrity import read_verified, sha256_file

CONFIG_FILE = "predictor.json"
WEIGHTS_FILE = "predictor.safetensors"


class ExpertPredictor:
    """Base class. Subclasses set ``name`` and implement ``fit`` and ``predict_proba``."""

    name: ClassVar[str] = ""
    needs_hidden: ClassVar[str | None] = None
    """Hidden-state kind the predictor reads from the Context (``router_input``/``residual_out``)."""
    previous_tokens: ClassVar[int] = 0
    """How many earlier tokens' routing the predictor reads."""

    def __init__(self, *, horizons: int = 3):
        self.horizons = horizons

    # --- estimator API ----------------------------------------------------------------
    def fit(self, train: TraceDataset, val: TraceDataset | None = None) -> ExpertPredictor:
        raise NotImplementedError

    def predict_proba(self, context: Context) -> torch.Tensor:
        """Scores (N, H, E) for layers context.layer+1 .. context.layer+H; rows of layers past
        the last one are undefined and never scored. Higher means more likely."""
        raise NotImplementedError

    def decode_key(
        self, layer: int, expert_ids: np.ndarray, gate_weights: np.ndarray, token_ids: np.ndarray
    ) -> Hashable | None:
        """What ``predict_proba`` reads from the routing-only context of these arrays (as
        :meth:`Context.from_routing` takes them, in numpy), as a hashable: contexts with equal
        keys get equal predictions, so a decoding loop may reuse an answer without building
        the context. None (the default): the prediction reads more than a key can hold."""
        return None

    def score(self, data: TraceDataset) -> float:
        from specmoe.predictors.metrics import evaluate_predictor

        rows = evaluate_predictor(self, data, bootstrap=0)
        means = [r["recall_at_k"] for r in rows if r["layer"] == "all"]
        return float(sum(means) / len(means))

    # --- introspection ----------------------------------------------------------------
    def get_params(self) -> dict:
        """Constructor arguments, from every ``__init__`` along the class hierarchy (a subclass
        may pass some on to its base as ``**kwargs``)."""
        names: dict[str, None] = {}
        for cls in type(self).__mro__:
            if "__init__" in vars(cls) and cls is not object:
                for name, param in inspect.signature(cls.__init__).parameters.items():
                    if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD:
                        names.setdefault(name)
        return {name: getattr(self, name) for name in names}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Fitted state as named tensors (what ``save`` writes)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        raise NotImplementedError

    def fitted_meta(self) -> dict:
        """Small JSON-able fitted facts (num_layers, num_experts, ...)."""
        return {}

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state_tensors().values())

    def check_fitted(self) -> None:
        if not self.fitted_meta():
            raise InputError(f"{self.name} predictor is not fitted; call fit() first")

    def check_fits(self, num_layers: int, num_experts: int, target: str) -> None:
        """Raise a clear error if this predictor was fitted for other layer or expert counts
        than ``target`` (what it is about to predict for, in words) has."""
        meta = self.fitted_meta()
        fitted = (meta.get("num_layers"), meta.get("num_experts"))
        if meta and fitted != (num_layers, num_experts):
            raise InputError(
                f"predictor {self.name} was fitted for {fitted[0]} MoE layers x {fitted[1]} experts; "
                f"{target} has {num_layers} x {num_experts}: train it on traces of that model"
            )

    # --- persistence ------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Weights first, then ``predictor.json`` with their SHA-256: each file is replaced
        atomically, and a kill between the two leaves a pair whose checksum does not match."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        with atomic.atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, tmp)
        config = {
            "predictor": self.name,
            "params": self.get_params(),
            "meta": self.fitted_meta(),
            "weights_sha256": sha256_file(directory / WEIGHTS_FILE),
        }
        atomic.write_json(directory / CONFIG_FILE, config)
        return directory


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); {RESAVE}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); {RESAVE}") from None
    except OSError as exc:
        raise storage_error(exc, path) from None
    if not isinstance(config, dict) or not isinstance(config.get("predictor"), str):
        raise InputError(f'{path}: not a predictor config (needs an object with a "predictor" name); {RESAVE}')
    meta = config.get("meta", {})
    if not isinstance(meta, dict) or any(
        not isinstance(meta.get(key, 1), int) or isinstance(meta.get(key), bool) or meta.get(key, 1) < 1
        for key in ("num_layers", "num_experts", "top_k", "hidden_size")
    ):
        raise InputError(f"{path}: meta must hold positive integers (num_layers, num_experts, top_k); {RESAVE}")
    return config


RESAVE = "train the predictor again, or restore its directory from a copy"


def load_predictor(directory: str | Path) -> ExpertPredictor:
    """Load a predictor saved with :meth:`ExpertPredictor.save`; its parameters are checked
    and its weights verified against the checksum saved with them."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from specmoe.predictors.registry import predictor_class

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{directory} is not a saved predictor: no {CONFIG_FILE}")
    config = _read_config(config_path)
    cls = predictor_class(config["predictor"])
    predictor = cls(**check_params(cls, config.get("params", {}), str(config_path)))
    weights = directory / WEIGHTS_FILE
    expected = config.get("weights_sha256")
    if expected is not None:
        data = read_verified(weights, str(expected), remedy=RESAVE)
    else:  # saved before checksums were recorded: nothing to check against
        try:
            data = weights.read_bytes()
        except OSError as exc:
            raise storage_error(exc, weights) from None
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise CorruptDataError(f"{weights}: cannot read predictor weights ({exc}); {RESAVE}") from None
    try:
        predictor.load_state_tensors(tensors, config.get("meta", {}))
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise InputError(f"{directory}: weights do not fit the saved parameters ({exc}); {RESAVE}") from None
    return predictor
