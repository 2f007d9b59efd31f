"""``specmoe bench offload``: its oracle reads into the next token by default, and an
oracle reach the fast tier cannot honour is refused before any expert is written."""

import json

import pytest

from specmoe.bench.offload import benchmark_offload
from specmoe.errors import InputError


def test_the_oracle_reaches_to_the_layer_before_its_own_in_the_next_token(finished_run):
    out, _ = finished_run
    report = json.loads((out / "offload" / "offload.json").read_text())
    assert report["oracle_lookahead"] == report["num_layers"] - 1
    assert {r["policy"] for r in report["rows"]} >= {"on-demand", "oracle"}


def test_an_oracle_lookahead_of_a_whole_token_is_refused(finished_run, tmp_path):
    out, _ = finished_run
    layers = json.loads((out / "offload" / "offload.json").read_text())["num_layers"]
    for bad in (layers, 0):  # a whole token ahead; and 0, which is no default
        with pytest.raises(InputError, match=f"--oracle-lookahead must be in \\[1, {layers - 1}\\]"):
            benchmark_offload(
                out / "traces", predictor_dirs=[], hidden=8, ffn=8, oracle_lookahead=bad, experts_dir=tmp_path
            )
