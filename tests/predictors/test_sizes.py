"""FLOPs of a prediction, counted by formula, against torch's own count of the matrix products."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from specmoe.models.shapes import model_compute
from specmoe.predictors.data import Context
from specmoe.predictors.registry import make_predictor
from specmoe.predictors.sizes import flops_per_call

SHAPE = {"num_layers": 4, "num_experts": 16, "top_k": 2, "hidden_size": 32, "vocab_size": 50}


def _counted(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _context(layer: int) -> Context:
    ids = torch.randint(0, SHAPE["num_experts"], (1, layer + 1, SHAPE["top_k"]))
    return Context.from_routing(
        layer, ids, torch.rand(ids.shape), torch.tensor([3]), SHAPE["num_layers"], SHAPE["num_experts"],
        hidden=torch.randn(1, layer + 1, SHAPE["hidden_size"]),
    )  # fmt: skip


@pytest.mark.parametrize("name", ["lookahead-corrected", "interlayer", "lookahead-mlp"])
def test_formula_covers_the_matrix_products_of_a_prediction(name):
    params = {"rank": 8} if name == "lookahead-corrected" else {"d_model": 32, "ff": 64, "heads": 2, "depth": 1}
    params = {} if name == "lookahead-mlp" else params
    predictor = make_predictor(name, **params)
    predictor.hidden_size_ = SHAPE["hidden_size"]
    predictor.init_module(SHAPE["num_layers"], SHAPE["num_experts"], SHAPE["top_k"])
    predictor.module_.eval()
    counted = _counted(lambda: predictor.module_(_context(0)))
    formula = flops_per_call(name, predictor.get_params(), **{k: v for k, v in SHAPE.items() if k != "num_layers"})
    assert counted <= formula <= 1.25 * counted


def test_one_moe_layer_of_mixtral_8x7b_is_its_two_experts_and_router():
    compute = model_compute("mistralai/Mixtral-8x7B-v0.1")
    assert compute.moe_layer_flops == 2 * (2 * 3 * 4096 * 14336 + 8 * 4096)
    assert 12.5e9 < compute.token_flops / 2 < 13.0e9  # published: 12.9B active parameters, embedding included
