"""`specmoe train` holds its output directory: a second writer is refused."""

import pytest

from specmoe.run.fit import fit_and_save
from specmoe.storage.locks import DirectoryLockedError
from tests.predictors.synthetic import make_synthetic_store
from tests.storage.test_locks import _holder


def test_a_second_trainer_into_the_same_directory_is_refused(tmp_path):
    make_synthetic_store(tmp_path / "traces", num_docs=16)
    holder = _holder(tmp_path / "p")
    try:
        with pytest.raises(DirectoryLockedError, match=f"in use by pid {holder.pid}"):
            fit_and_save("popularity", tmp_path / "traces", tmp_path / "p", progress=False)
    finally:
        holder.kill()
        holder.wait()
    _, info = fit_and_save("popularity", tmp_path / "traces", tmp_path / "p", progress=False)
    assert info["predictor"] == "popularity"
