"""Parameter counts and compute of predictors for a model shape, without fitting them."""

from __future__ import annotations

from specmoe.errors import InputError
from specmoe.predictors.registry import make_predictor, predictor_class


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

    cross_token = hasattr(predictor_class(name), "predict_next")  # a depth, not horizons
    predictor = make_predictor(name, preset, **({} if cross_token else {"horizons": horizons}))
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
    if name in ("ngram", "token", "next-token-table"):
        return "data-dependent (sparse table)"
    if name == "history":
        return "data-dependent (recorded windows)"
    return "sum of members"


def flops_per_call(
    name: str, params: dict, *, hidden_size: int, num_experts: int, top_k: int, vocab_size: int, horizons: int = 3
) -> float:
    """FLOPs (2 per multiply-add) of one prediction for one token, as the predictor computes
    it (dense where the code is dense), at a model's shape: after one layer for in-token
    predictors, once per token for cross-token ones. Table lookups count their arithmetic
    only. ``params``: the predictor's constructor arguments (its ``get_params()``)."""
    predictor = make_predictor(name, **params)
    p = predictor.get_params()
    d, e, k, h = hidden_size, num_experts, top_k, horizons
    lookahead = h * (2 * d * e + 4 * d)
    if name in ("combo", "ensemble", "stack"):
        members = [predictor.make_member(spec) for spec in predictor.members]
        shape = {"hidden_size": d, "num_experts": e, "top_k": k, "vocab_size": vocab_size, "horizons": h}
        return 2 * len(members) * h * e + sum(flops_per_call(m.name, m.get_params(), **shape) for m in members)
    if name == "popularity":
        return 0.0
    if name == "transition":
        return 2.0 * h * k * e
    if name == "ngram":
        return 2.0 * h * k * e + 4.0 * h * e
    if name == "token":
        return 4.0 * h * e
    if name == "lookahead":
        return float(lookahead)
    if name == "lookahead-corrected":
        r = p["rank"]
        return lookahead + 2 * r * d + 2 * h * r * e + 2 * h * e * e * (1 + p["neighbour"]) + 3 * h * e
    if name == "lookahead-mlp":
        w = p["width"]
        return 2 * d * w + 8 * w * w + 2 * w * h * (e + 1) + p["context_layers"] * k * w
    if name in ("interlayer", "multiscale"):
        dm, ff, slots = p["d_model"], p["ff"], p["memory_slots"]
        windows = (2, 3, 4) if name == "multiscale" else (p["context_layers"],)
        flops = 0.0
        for c in windows:
            tokens = c + h + p["neighbour_tokens"] * h
            flops += p["depth"] * (2 * tokens * (4 * dm * dm + 2 * dm * ff) + 4 * tokens * tokens * dm)
        flops += 2 * (2 * h * dm * dm + 2 * slots * dm * dm) + 4 * h * slots * dm  # pattern memory
        return flops + 2 * h * dm * (e + 1)
    if name in ("next-token-table", "next-token-corrected"):
        depth, candidates = p["depth"], p["candidates"]
        flops = 2.0 * d * vocab_size + 2 * depth * candidates * e  # the lens, then the table rows mixed
        if name == "next-token-corrected":
            r = p["rank"]
            flops += 2 * r * d + 2 * depth * r * e + 2 * depth * e * e + 3 * depth * e
        return flops
    raise InputError(f"no FLOPs formula for predictor {name!r}")
