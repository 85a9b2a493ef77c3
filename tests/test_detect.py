"""Auto-detection of an original checkpoint's model and map (zoo.detect), in zoo convert and create_model.

Checkpoints are made in the originals' containers and key/shape layouts (from the fixtures' layout files
where they exist), with every tensor a stride-0 view of one zero, so even DeiT-B or DETR-R50 layouts cost
bytes on disk; detection compares names and shapes only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import zoo
import zoo.convert
from conftest import fixture_dir
from zoo import detect
from zoo.checkpoint import load_checkpoint
from zoo.cli import main
from zoo.convert import ConversionMap
from zoo.errors import ConfigError, ConversionError
from zoo.factory import convert_checkpoint
from zoo.paths import hub_dir
from zoo.registry import list_models, model_info

DEIT = list_models("deit_*")
ZERO = torch.zeros(())


def _layout_state(layout) -> dict:
    """(key, shape) pairs -> a state dict of zero views (int64 scalars for num_batches_tracked)."""
    pairs = layout.items() if isinstance(layout, dict) else [(entry[0], entry[1]) for entry in layout]
    return {k: torch.zeros((), dtype=torch.int64) if k.endswith("num_batches_tracked") else ZERO.expand(*shape)
            for k, shape in pairs}


def _deit_checkpoint(name: str, with_args: bool = True, ema: dict | None = None) -> dict:
    """DeiT-with-iRPE main.py's container; the layout is the registered model's (test_irpe_deit holds it to the
    spec's key list)."""
    state = _layout_state({k: list(v.shape) for k, v in detect.model_signature(name, model_info(name).kwargs).items()})
    checkpoint = {"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 299,
                  "model_ema": ema if ema is not None else state, "scaler": {}}
    if with_args:
        checkpoint["args"] = argparse.Namespace(model=name, nb_classes=1000, input_size=224, batch_size=64)
    return checkpoint


def _leader_checkpoint(variant: str, with_arch: bool = True) -> dict:
    """leaderj1001 main.py's container with the layout of the fixture's key listing (ResNet26_classes10_stemFalse ...)."""
    layouts = json.loads((fixture_dir("sasa") / "leader_resnet_state_dict_keys.json").read_text())["models"]
    checkpoint = {"epoch": 12, "state_dict": _layout_state(layouts[variant]["state_dict"]), "best_acc": 80.0,
                  "optimizer": {"state": {}, "param_groups": []}, "parameters": layouts[variant]["num_params"]}
    if with_arch:
        checkpoint["arch"] = variant.split("_")[0]
    return checkpoint


def _save(checkpoint: dict, path, legacy: bool = False):
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


LEADER = {"ResNet26_classes10_stemFalse": "sasa_resnet26_cifar", "ResNet26_classes10_stemTrue": "sasa_resnet26_cifar",
          "ResNet38_classes10_stemFalse": "sasa_resnet38_cifar", "ResNet50_classes10_stemFalse": "sasa_resnet50_cifar",
          "ResNet50_classes1000_stemTrue": "sasa_resnet50_cifar"}


# -------------------------------------------------------------------------------------------- recorded

@pytest.mark.parametrize("name", DEIT)
def test_every_deit_variant_is_detected_from_args_and_from_its_shapes(name):
    found = detect.detect(_deit_checkpoint(name))
    assert (found.model, found.converter, found.how) == (name, "irpe-deit", "recorded")
    assert found.kwargs == {"num_classes": 1000, "img_size": 224}
    stripped = detect.detect(_deit_checkpoint(name, with_args=False))  # a copy stripped of its args
    assert (stripped.model, stripped.converter) == (name, "irpe-deit")


@pytest.mark.parametrize("variant", list(LEADER))
def test_every_leaderj1001_resnet_is_detected_from_arch_and_from_its_shapes(variant):
    found = detect.detect(_leader_checkpoint(variant))
    assert (found.model, found.converter, found.how) == (LEADER[variant], "sasa-leader", "recorded")
    assert found.kwargs["bug_compatible"] is True and found.kwargs["stem"] == ("attention" if "True" in variant else "conv")
    assert detect.detect(_leader_checkpoint(variant, with_arch=False)).model == LEADER[variant]


def test_detr_args_and_released_layouts_without_args():
    found = detect.detect(load_checkpoint(fixture_dir("irpe") / "detr_tiny_rpe-2.0-product-ctx-1-k.pth"))
    assert (found.model, found.converter) == ("detr_r50_irpe", "irpe-detr")
    assert found.kwargs["backbone_width_div"] == 16 and found.kwargs["hidden_dim"] == 64
    configs = json.loads((fixture_dir("irpe") / "detr_r50_irpe_keys.json").read_text())["configs"]
    seven = detect.detect({"model": _layout_state(configs["rpe-1.9-product-ctx-1-k"]["keys"])})
    assert (seven.model, seven.converter, seven.how) == ("detr_r50_irpe_product_ctx_7x7", "irpe-detr", "signature")
    nine = detect.detect({"model": _layout_state(configs["rpe-2.0-product-ctx-1-k"]["keys"])})
    assert nine.model == "detr_r50_irpe"  # 9x9 is the map's target, whose default spec it is


# -------------------------------------------------------------------------------------------- conversion

@pytest.mark.slow
@pytest.mark.parametrize("name", DEIT)
def test_convert_every_deit_checkpoint_without_model(tmp_path, name):
    src = _save(_deit_checkpoint(name), tmp_path / f"{name}.pth")
    out = convert_checkpoint(src, out_dir=tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["converter"]) == (name, "irpe-deit")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ResNet26_classes10_stemFalse", "ResNet38_classes10_stemFalse",
                                     "ResNet50_classes10_stemFalse"])
def test_convert_every_leaderj1001_checkpoint_without_model(tmp_path, variant):
    src = _save(_leader_checkpoint(variant), tmp_path / f"model_CIFAR10_{variant}_ckpt.tar", legacy=True)
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 0  # neither --from nor --model
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model"], config["converter"]) == (LEADER[variant], "sasa-leader")
    assert config["kwargs"]["bug_compatible"] is True  # the flag the original weights need, recorded
    model = zoo.create_model(config["model"], weights=str(tmp_path / "out"))
    assert model.bug_compatible and model.layer1[0].conv2[0].bug_compatible


def test_strict_failure_names_the_model_that_fits(tmp_path):
    src = _save(_leader_checkpoint("ResNet38_classes10_stemFalse"), tmp_path / "ckpt.tar", legacy=True)
    with pytest.raises(ConversionError, match="--model sasa_resnet38_cifar --from sasa-leader"):
        convert_checkpoint(src, "sasa-leader", tmp_path / "out", model_name="sasa_resnet26_cifar")
    with pytest.raises(ConversionError, match="sasa_resnet38_cifar"):  # --model without --from
        detect.detect(load_checkpoint(src), model_name="sasa_resnet26_cifar")


def test_true_ambiguity_lists_the_candidates_and_no_fit_says_so():
    layout = json.loads((fixture_dir("rsa") / "rsanet_r50_keys.json").read_text())["state_dict"]
    checkpoint = {"epoch": 1, "arch": "ResNet", "state_dict": _layout_state(layout), "best_prec1": 50.0}
    found = detect.detect(checkpoint)  # rsanet_r50 and its two _16f aliases fit: the map's target wins
    assert (found.model, found.converter) == ("rsanet_r50", "rsa")  # never the auto_detect: false variant map
    elsewhere = ConversionMap.from_dict({"name": "rsa-test", "target_model": "rsanet_mini", "container": ["state_dict"],
                                         "strip_prefixes": ["module."]})
    with pytest.raises(ConversionError, match="--model rsanet_r50_ssv1_16f .*--model rsanet_r50_ssv2_16f"):
        detect.detect(checkpoint, elsewhere)
    assert detect.detect(checkpoint, elsewhere, model_name="rsanet_r50_ssv2_16f").model == "rsanet_r50_ssv2_16f"
    with pytest.raises(ConversionError, match="no registered model shares the key names"):
        detect.detect({"state_dict": {"encoder.weight": torch.zeros(3, 3)}})
    broken = _leader_checkpoint("ResNet26_classes10_stemFalse")
    broken["state_dict"].pop("dense.bias")
    with pytest.raises(ConversionError, match="(?s)closest is sasa_resnet26_cifar .*207 of 208 keys agree.*missing.*dense.bias"):
        detect.detect(broken)


def test_signatures_are_built_on_the_meta_device_once(monkeypatch):
    detect._SIGNATURES.clear()
    detect.detect(_leader_checkpoint("ResNet50_classes10_stemFalse", with_arch=False))
    signatures = [sd for sd in detect._SIGNATURES.values() if isinstance(sd, dict)]
    assert signatures and all(t.is_meta for sd in signatures for t in sd.values())
    built = len(detect._SIGNATURES)

    def no_build(name):
        raise AssertionError(f"{name} was built again")

    monkeypatch.setattr(detect, "model_constructor", no_build)
    monkeypatch.setattr(detect, "_same_kind", lambda d: True)
    assert detect.detect(_leader_checkpoint("ResNet50_classes10_stemFalse", with_arch=False)).model == \
        "sasa_resnet50_cifar"
    assert len(detect._SIGNATURES) == built


# -------------------------------------------------------------------------------------------- create_model

def test_create_model_recognises_an_original_checkpoint_and_converts_once(tmp_path, monkeypatch):
    checkpoint = _leader_checkpoint("ResNet26_classes10_stemTrue")
    checkpoint["state_dict"]["dense.bias"] = torch.arange(10.0)
    src = _save(checkpoint, tmp_path / "best_model_CIFAR10_ResNet26_True_ckpt.tar", legacy=True)
    model = zoo.create_model("sasa_resnet26_cifar", weights=str(src))  # neither converter= nor kwargs
    assert model.bug_compatible and model.init[0].__class__.__name__ == "AttentionStem" and not model.training
    assert torch.equal(model.dense.bias, torch.arange(10.0))
    cached = list((hub_dir() / "converted" / "sasa-leader").rglob("*.safetensors"))
    assert len(cached) == 1

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(zoo.weights.convert, "convert_state_dict", no_conversion)
    again = zoo.create_model("sasa_resnet26_cifar", weights=str(src), converter="sasa-leader")
    assert torch.equal(again.dense.bias, model.dense.bias)


def test_ema_weights_are_selected_with_ema(tmp_path):
    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    ones = {k: torch.ones(()).expand(v.shape) for k, v in _deit_checkpoint(name)["model"].items()}
    src = _save(_deit_checkpoint(name, ema=ones), tmp_path / "checkpoint.pth")
    out = tmp_path / "ema"
    assert main(["convert", str(src), "--out", str(out), "--ema"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ema"] is True and config["model"] == name
    assert all(bool((v == 1).all()) for v in load_checkpoint(out / "model.safetensors").values())
    model = zoo.create_model(name, weights=str(src), ema=True)
    assert all(bool((p == 1).all()) for p in model.parameters())
    plain = zoo.create_model(name, weights=str(src))
    assert all(bool((p == 0).all()) for p in plain.parameters())
    assert zoo.create_model(name, weights=str(out), ema=True) is not None  # a folder of EMA weights
    assert main(["convert", str(src), "--out", str(tmp_path / "main")]) == 0
    with pytest.raises(ConfigError, match="converted RelZoo folder"):  # it kept the main weights only
        zoo.create_model(name, weights=str(tmp_path / "main"), ema=True)
    no_ema = _deit_checkpoint(name)
    no_ema["model_ema"] = None
    with pytest.raises(ConversionError, match="no EMA weights"):
        convert_checkpoint(_save(no_ema, tmp_path / "no_ema.pth"), out_dir=tmp_path / "x", ema=True)


def test_create_model_builds_the_architecture_an_original_detr_checkpoint_records():
    src = fixture_dir("irpe") / "detr_tiny_rpe-2.0-product-ctx-1-k.pth"
    model = zoo.create_model("detr_r50_irpe", weights=str(src))  # no kwargs: hidden 64, width/16 from args
    assert model.transformer.d_model == 64 and model.num_queries == 10
    state = load_checkpoint(src)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_an_original_checkpoint_takes_a_new_head(tmp_path):
    """create_model's new-head rule (num_classes=N) applies after the checkpoint is recognised as it was saved."""
    name = "deit_tiny_patch16_224_ctx_product_50_shared_k"
    checkpoint = _deit_checkpoint(name)
    checkpoint["model"]["pos_embed"] = torch.arange(197 * 192.0).view(1, 197, 192)
    model = zoo.create_model(name, weights=str(_save(checkpoint, tmp_path / "checkpoint.pth")), num_classes=5)
    assert model.head.weight.shape == (5, 192) and torch.equal(model.pos_embed, checkpoint["model"]["pos_embed"])


def stem_kwargs_hook(checkpoint) -> dict:
    """The model_kwargs hook of a user's own map (test_create_model_runs_a_users_map_only_when_trusted)."""
    return {"stem": "attention", "bug_compatible": True}


def test_create_model_runs_a_users_map_only_when_trusted(tmp_path):
    text = (Path(zoo.convert.__file__).parents[1] / "convert" / "sasa-leader.yaml").read_text()
    user_map = tmp_path / "my-leader.yaml"
    user_map.write_text(text.replace("zoo.models.sasa_resnet:leader_checkpoint_kwargs", "test_detect:stem_kwargs_hook"))
    src = _save(_leader_checkpoint("ResNet26_classes10_stemTrue"), tmp_path / "ckpt.tar")
    with pytest.raises(ConfigError, match="trust-map"):  # a map from outside the package is code
        zoo.create_model("sasa_resnet26_cifar", weights=str(src), converter=str(user_map))
    model = zoo.create_model("sasa_resnet26_cifar", weights=str(src), converter=str(user_map), trust_map=True)
    assert model.bug_compatible and model.init[0].__class__.__name__ == "AttentionStem"
