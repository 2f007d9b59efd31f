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

from specmoe.errors import InputError
from specmoe.predictors.data import Context, TraceDataset

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
        from specmoe.evaluation.metrics import evaluate_predictor

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
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        save_file(tensors, directory / WEIGHTS_FILE)
        config = {"predictor": self.name, "params": self.get_params(), "meta": self.fitted_meta()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory


def load_predictor(directory: str | Path) -> ExpertPredictor:
    """Load a predictor saved with :meth:`ExpertPredictor.save`."""
    from safetensors.torch import load_file

    from specmoe.predictors.registry import predictor_class

    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{directory} is not a saved predictor: no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
        cls = predictor_class(config["predictor"])
        predictor = cls(**config["params"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{config_path}: not a valid predictor config ({exc})") from None
    weights = directory / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except Exception as exc:  # safetensors raises its own types for bad files
        raise InputError(f"{weights}: cannot read predictor weights ({exc})") from None
    predictor.load_state_tensors(tensors, config.get("meta", {}))
    return predictor
