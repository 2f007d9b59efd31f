"""``specmoe evaluate`` on a saved predictor directory."""

import pytest

from specmoe.errors import InputError
from specmoe.evaluation.evaluate import evaluate_directory
from tests.predictors.synthetic import save_popularity


def test_a_predictor_fitted_for_another_model_is_refused(finished_run, tmp_path):
    out, _ = finished_run
    alien = save_popularity(tmp_path / "alien", 7, 5)
    with pytest.raises(InputError, match="fitted for 7 MoE layers x 5 experts; the traces in"):
        evaluate_directory(alien, out / "traces", bootstrap=0)
