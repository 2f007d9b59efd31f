import numpy as np

from specmoe.traces.stats import _entropy_bits, _mutual_information_bits


def test_entropy_and_mutual_information_on_known_distributions():
    assert _entropy_bits(np.array([5, 5, 5, 5])) == 2.0
    assert _entropy_bits(np.array([7, 0, 0])) == 0.0
    assert abs(_mutual_information_bits(np.eye(4) * 10) - 2.0) < 1e-9  # deterministic map: log2(4)
    assert abs(_mutual_information_bits(np.ones((4, 4)))) < 1e-12  # independent
