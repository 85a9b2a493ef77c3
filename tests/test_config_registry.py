"""Configs are validated with errors naming file and field; the registry lists, finds and builds models."""
from __future__ import annotations

import shutil
import textwrap

import pytest
import torch
from torch import nn

import zoo
import zoo.config
import zoo.registry
from zoo.config import load_family_config
from zoo.errors import ConfigError, UnknownModelError, WeightsError


def _write(tmp_path, name, text):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """
    family: toyfam
    title: Toy family
    models:
      toy_linear:
        task: classification
        kwargs: {width: 4}
        eval: {protocol: imagenet}
        default_weights: v1
        weights:
          v1: {source: weights/toy.safetensors, sha256: null}
        reported:
          - {metric: top1, value: 50, dataset: toyset, weights: v1, source: "made up"}
          - {metric: top1, value: 40, dataset: toyset, source: "paper", verified: false}
"""


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    """The real configs plus a 'toyfam' family whose model 'toy_linear' is registered for this test."""
    configs = tmp_path / "configs"
    shutil.copytree(zoo.paths.configs_dir(), configs)
    _write(configs, "toyfam", GOOD)
    monkeypatch.setattr(zoo.config, "configs_dir", lambda: configs)
    zoo.config.all_model_configs.cache_clear()

    def toy_linear(width=2, bias=True):
        return nn.Linear(width, 3, bias=bias)

    zoo.registry.register_model(toy_linear)
    yield configs
    zoo.registry._constructors.pop("toy_linear", None)
    zoo.config.all_model_configs.cache_clear()


def test_valid_config_is_typed(tmp_path):
    fam = load_family_config(_write(tmp_path, "toyfam", GOOD))
    cfg = fam.models["toy_linear"]
    assert cfg.family == "toyfam" and cfg.kwargs == {"width": 4}
    assert cfg.weights_entry().source == "weights/toy.safetensors"
    assert [r.value for r in cfg.reported_for("v1")] == [50.0]
    assert not cfg.reported[1].verified


@pytest.mark.parametrize("bad, field", [
    (GOOD.replace("task: classification", "tsk: classification"), "models.toy_linear: unknown field(s) ['tsk']"),
    (GOOD.replace("family: toyfam", "family: other"), "field 'family' is 'other'"),
    (GOOD.replace("default_weights: v1", "default_weights: v2"), "models.toy_linear.default_weights"),
    (GOOD.replace("value: 50", "value: fifty"), "models.toy_linear.reported[0].value"),
    (GOOD.replace("sha256: null", "sha256: abc"), "models.toy_linear.weights.v1.sha256"),
    (GOOD.replace("weights: v1, source", "weights: v9, source"), "reported[0].weights"),
    (GOOD + "\n  bad: [unclosed\n", "not valid YAML"),
])
def test_malformed_config_names_file_and_field(tmp_path, bad, field):
    path = _write(tmp_path, "toyfam", bad)
    with pytest.raises(ConfigError) as info:
        load_family_config(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_every_registered_model_has_a_config_and_back():
    configs = zoo.config.all_model_configs()
    registered = set(zoo.list_models())
    assert registered == set(configs), (registered ^ set(configs))


def test_unknown_model_suggests_close_matches(toy_family):
    with pytest.raises(UnknownModelError, match="did you mean toy_linear"):
        zoo.create_model("toy_linaer")


def test_list_models_patterns_and_pretrained(toy_family):
    assert "toy_linear" in zoo.list_models("toy_*")
    assert zoo.list_models("toy_?inear") == ["toy_linear"]
    assert "toy_linear.v1" in zoo.list_models("toy_*", pretrained=True)
    assert "toy_linear" not in zoo.list_models("nothing*")


def test_create_model_applies_config_kwargs_then_overrides(toy_family):
    assert zoo.create_model("toy_linear").in_features == 4
    assert zoo.create_model("toy_linear", width=6, bias=False).bias is None


def test_unknown_weights_tag_is_a_clear_error(toy_family):
    with pytest.raises(WeightsError, match="no weights tagged 'v7'.*known tags: v1"):
        zoo.create_model("toy_linear.v7")


def test_model_info_accepts_tag(toy_family):
    assert zoo.model_info("toy_linear.v1").name == "toy_linear"


def test_create_model_loads_a_converted_folder(toy_family, tmp_path):
    """weights=DIR: kwargs recorded in config.json are used, the weights load strictly."""
    import json

    from safetensors.torch import save_file

    src = nn.Linear(5, 3)
    folder = tmp_path / "converted"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model": "toy_linear", "kwargs": {"width": 5}}))
    model = zoo.create_model("toy_linear", weights=str(folder))
    assert not model.training
    x = torch.randn(2, 5)
    torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
