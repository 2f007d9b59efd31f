"""Parameter counts of predictors for a model shape, without fitting them."""

from __future__ import annotations

from specmoe.predictors.registry import make_predictor


def parameter_count(
    name: str,
    preset: str | None,
    num_layers: int,
    num_experts: int,
    top_k: int,
    hidden_size: int = 1024,
    horizons: int = 3,
) -> str:
    """A number, or a short description where the size depends on the data."""
    from specmoe.predictors.neural.base import TorchPredictor

    predictor = make_predictor(name, preset, horizons=horizons)
    if isinstance(predictor, TorchPredictor):
        predictor.hidden_size_ = hidden_size
        predictor.init_module(num_layers, num_experts, top_k)
        return f"{predictor.num_parameters():,}"
    dense = {
        "popularity": num_layers * num_experts,
        "transition": num_layers * num_experts * (1 + horizons * num_experts),
        "lookahead": 0,
    }
    if name in dense:
        return f"{dense[name]:,}" + (" (copied router)" if name == "lookahead" else "")
    return "data-dependent (sparse table)" if name in ("ngram", "token") else "sum of members"
