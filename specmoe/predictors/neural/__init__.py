"""Torch predictors; importing this package registers them."""

from specmoe.predictors.lookahead import RouterLookaheadPredictor
from specmoe.predictors.neural.corrected import CorrectedLookaheadPredictor
from specmoe.predictors.neural.cross_token import NextTokenCorrectedPredictor
from specmoe.predictors.neural.ensemble import EnsemblePredictor
from specmoe.predictors.neural.interlayer import SEED_PRESETS, InterLayerPredictor, MultiScalePredictor
from specmoe.predictors.neural.lookahead_mlp import LookaheadMLPPredictor
from specmoe.predictors.registry import register

register(InterLayerPredictor, SEED_PRESETS)
register(MultiScalePredictor, SEED_PRESETS)
register(LookaheadMLPPredictor)
register(RouterLookaheadPredictor)
register(EnsemblePredictor)
register(CorrectedLookaheadPredictor)
register(NextTokenCorrectedPredictor)
