"""Tiny ``specmoe run`` set-ups: a corpus and config overrides that take seconds on CPU."""

import json
import random
import string

import yaml


def write_run_corpus(path, documents: int = 40):
    """Enough distinct short documents that the 80/10/10 document split (which keeps
    near-duplicates together) leaves some in every part."""
    docs = []
    for i in range(documents):
        rng = random.Random(i)
        words = ("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(70))
        docs.append({"id": f"doc{i}", "text": " ".join(words)})
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return path


TORCH_PREDICTORS = {"interlayer", "multiscale", "lookahead-mlp", "lookahead-corrected"}


def tiny_run_config(config_path, checkpoint, corpus, *, offload: bool = True, extra: tuple[str, ...] = ()):
    """A run config (a YAML file, or None for the default) shrunk to seconds on a tiny model:
    the same stages and code paths, with fewer tokens, steps and repeats."""
    from specmoe.run.config import RunConfig, make_run_config

    data = yaml.safe_load(config_path.read_text()) if config_path else RunConfig().model_dump(mode="json")
    for spec in data["predictors"]["models"]:
        if spec["name"] in TORCH_PREDICTORS:
            spec["params"] = {**spec.get("params", {}), "epochs": 1, "max_steps_per_epoch": 3, "batch_size": 64}
    overrides = [
        f"model.id={checkpoint}",
        f"collect.texts=[{corpus}]",
        "collect.max_tokens=8000",
        "collect.seq_len=32",
        "collect.batch_size=8",
        "predictors.bootstrap=20",
        "simulate.max_windows=4",
        "simulate.batch_sizes=[1, 2]",
        f"offload.enabled={'true' if offload else 'false'}",
        "offload.expert_shape=[32, 64]",
        "offload.tokens=6",
        "offload.repeats=1",
        *extra,
    ]
    return make_run_config(data, overrides)
