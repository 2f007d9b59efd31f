from pathlib import Path

import pytest
import yaml

from specmoe.errors import InputError
from specmoe.run.config import RunConfig, load_run_config
from tests.tiny_models import TINY_MODEL_TYPES

CONFIGS = Path(__file__).parents[2] / "configs"
REAL_MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "builtin.yaml")


def test_builtin_yaml_is_the_default():
    assert load_run_config(CONFIGS / "builtin.yaml") == RunConfig()


def test_every_issue_model_has_a_config():
    names = {p.stem for p in REAL_MODEL_CONFIGS}
    assert names == {
        "switch-base-128",
        "mixtral-8x7b",
        "qwen1.5-moe-a2.7b",
        "qwen3-30b-a3b",
        "olmoe-1b-7b",
        "deepseek-v2-lite",
        "gpt-oss-20b",
    }


@pytest.mark.parametrize("path", REAL_MODEL_CONFIGS, ids=lambda p: p.stem)
def test_real_model_config_is_valid_and_names_a_supported_architecture(path):
    config = load_run_config(path)
    assert config.model.model_type in TINY_MODEL_TYPES
    assert not config.model.trust_remote_code
    assert yaml.safe_load(path.read_text())["model"]["id"] == config.model.id


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("collect:\n  max_tokenz: 5\n")
    with pytest.raises(InputError, match=r"collect\.max_tokenz"):
        load_run_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("simulate.cache_fractions=[0.2, 1.5]", r"simulate\.cache_fractions: fractions must lie in \(0, 1\]"),
        ("offload.prefetch_predictors=[oracle9]", "oracle9"),
        ("collect.max_tokens=-3", r"collect\.max_tokens"),
        ("nonsense", "section.key=value"),
        ("collect.texts=[]", r"collect\.texts"),
    ],
)
def test_bad_values_get_specific_errors(override, message):
    with pytest.raises(InputError, match=message):
        load_run_config(None, [override])


def test_overrides_use_yaml_values():
    config = load_run_config(None, ["collect.max_tokens=1234", "simulate.batch_sizes=[1, 4]", "model.id=olmoe-64e"])
    assert config.collect.max_tokens == 1234 and config.simulate.batch_sizes == (1, 4)
    assert config.model.id == "olmoe-64e"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match="mapping of sections"):
        load_run_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "spec",
    [
        "{name: ../../victim}",
        "{name: token, preset: ../../victim}",
        "{name: token, preset: /tmp/victim}",
        "{name: .., preset: x}",
        "{name: 'a/b'}",
    ],
)
def test_predictor_names_and_presets_that_would_leave_the_run_directory_are_refused(spec):
    """A predictor's label names run-directory paths (predictors/<label>/, metrics/<label>.json)."""
    with pytest.raises(InputError, match=r"predictors\.models\.0.*not a safe name"):
        load_run_config(
            None, [f"predictors.models=[{spec}]", "simulate.prefetch_predictors=null", "offload.prefetch_predictors=[]"]
        )
