"""SASA ResNets: paper parameter counts, the leaderj1001 CIFAR layout and block, the sasa-leader converter."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_dir, load_case

import zoo
from zoo.config import all_model_configs
from zoo.factory import convert_checkpoint
from zoo.errors import WeightsError
from zoo.models.sasa_resnet import LeaderBottleneck, SASACifarResNet, leader_checkpoint_kwargs
from zoo.registry import list_models, model_info

IMAGENET = ["sasa_resnet26", "sasa_resnet26_convstem", "sasa_resnet38", "sasa_resnet38_convstem", "sasa_resnet50",
            "sasa_resnet50_convstem"]
CIFAR = {26: "sasa_resnet26_cifar", 38: "sasa_resnet38_cifar", 50: "sasa_resnet50_cifar"}


def _leader_layouts() -> dict:
    return json.loads((fixture_dir("sasa") / "leader_resnet_state_dict_keys.json").read_text())


def test_every_sasa_model_is_registered_with_a_config():
    configs = all_model_configs()
    names = [n for n in list_models("sasa_*") if n != "sasa_resnet_mini"]  # the RelZoo-mini is tested in test_mini.py
    assert sorted(names) == sorted(IMAGENET + list(CIFAR.values()))
    assert all(configs[n].family == "sasa" for n in names)


@pytest.mark.parametrize("name", IMAGENET)
def test_parameter_count_within_1_percent_of_the_paper(name):
    model = zoo.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    (reported,) = [r for r in model_info(name).reported if r.metric == "params_M"]
    assert abs(count - reported.value) / reported.value < 0.01, (name, count, reported.value)


def test_imagenet_models_run_and_keep_torchvision_keys():
    full = zoo.create_model("sasa_resnet26").eval()
    conv = zoo.create_model("sasa_resnet26_convstem").eval()
    with torch.no_grad():
        assert full(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        assert conv.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)
    keys = set(full.state_dict())
    assert {"stem.0.query.weight", "stem.1.running_mean", "layer2.0.conv2.rel_row", "layer2.0.downsample.0.weight",
            "fc.weight"} <= keys
    assert "conv1.weight" in conv.state_dict() and "stem.0.query.weight" not in conv.state_dict()
    # strided blocks: attention at stride 1, then the 2x2 average pool inside conv2
    assert full.layer2[0].conv2.stride == 2 and full.layer2[0].conv2.pool is not None


def test_no_official_weights_and_info_says_so():
    for name in IMAGENET + list(CIFAR.values()):
        cfg = model_info(name)
        assert cfg.weights == {} and cfg.default_weights is None
        assert "No official" in cfg.notes or "No released weights" in cfg.notes
    with pytest.raises(WeightsError, match="no default pretrained weights"):
        zoo.create_model("sasa_resnet50", pretrained=True)


def test_single_source_rows_are_flagged():
    for name in ("sasa_resnet26", "sasa_resnet38_convstem"):
        assert all(not r.verified and "single source" in r.note for r in model_info(name).reported)
    assert all(r.verified for r in model_info("sasa_resnet50").reported)


@pytest.mark.parametrize("variant", ["ResNet26_classes10_stemFalse", "ResNet26_classes1000_stemTrue",
                                     "ResNet38_classes10_stemTrue", "ResNet50_classes10_stemFalse"])
def test_cifar_layout_matches_the_original_state_dict(variant):
    expected = _leader_layouts()["models"][variant]
    depth = int(variant[6:8])
    model = zoo.create_model(CIFAR[depth], num_classes=int(variant.split("classes")[1].split("_")[0]),
                             stem="attention" if variant.endswith("True") else "conv")
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, shape) for k, shape in expected["state_dict"].items()]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]


def test_leader_bottleneck_fixture_parity():
    meta, t = load_case("sasa", "leader_bottleneck_s2")
    block = LeaderBottleneck(meta["ctor"]["in_channels"], meta["ctor"]["out_channels"], meta["ctor"]["stride"],
                             bug_compatible=True).eval()
    block.load_state_dict({k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}, strict=True)
    x = t["input"].clone().requires_grad_(True)
    out = block(x)
    tol = meta["tolerance"]["float32"]
    torch.testing.assert_close(out, t["output"], **tol["output"])
    (out * t["grad_output"]).sum().backward()
    torch.testing.assert_close(x.grad, t["grad_input"], **tol["grad_input"])
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, t[f"grad_{name}"], **tol["grad_params"], msg=lambda m: f"{name}: {m}")


def test_leader_bottleneck_default_pools_right_after_attention():
    torch.manual_seed(0)
    fixed = LeaderBottleneck(32, 8, stride=2).eval()
    x = torch.randn(1, 32, 8, 8)
    attention, bn, relu = fixed.conv2
    expected = F.relu(fixed.conv3(relu(bn(F.avg_pool2d(attention(fixed.conv1(x)), 2)))) + fixed.shortcut(x))
    torch.testing.assert_close(fixed(x), expected)


def test_cifar_bug_compatible_head_needs_32x32():
    model = SASACifarResNet((1, 1, 1, 1), num_classes=10, bug_compatible=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        with pytest.raises(ValueError, match="needs 32x32 inputs"):
            model(torch.randn(1, 3, 64, 64))
        assert SASACifarResNet((1, 1, 1, 1)).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def _fake_leader_checkpoint(path, variant: str, arch: str) -> dict:
    """main.py's container with exactly the original's keys and shapes (values random), saved in the
    legacy (non-zip) format of torch 1.0."""
    gen = torch.Generator().manual_seed(0)
    layout = _leader_layouts()["models"][variant]["state_dict"]

    def value(key, shape):
        if key.endswith("num_batches_tracked"):
            return torch.tensor(7, dtype=torch.int64)
        if key.endswith("running_var"):
            return torch.rand(shape, generator=gen) + 0.5
        return torch.randn(shape, generator=gen) * 0.05

    state = {k: value(k, shape) for k, shape in layout.items()}
    checkpoint = {"epoch": 299, "arch": arch, "state_dict": state, "best_acc": 90.94,
                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0,
                                                                "weight_decay": 1e-4, "nesterov": False,
                                                                "params": list(range(len(state)))}]},
                  "parameters": 8306634}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return state


@pytest.mark.parametrize("variant,model_name", [("ResNet26_classes10_stemFalse", None),
                                                ("ResNet26_classes10_stemTrue", None),
                                                ("ResNet38_classes1000_stemFalse", "sasa_resnet38_cifar")])
def test_convert_leader_checkpoint(tmp_path, variant, model_name):
    src = tmp_path / "best_model_CIFAR10_ResNet_ckpt.tar"
    state = _fake_leader_checkpoint(src, variant, arch=variant.split("_")[0])
    out = convert_checkpoint(src, "sasa-leader", tmp_path / "converted", model_name=model_name)
    config = json.loads((out / "config.json").read_text())
    assert config["kwargs"]["bug_compatible"] is True
    assert config["kwargs"]["stem"] == ("attention" if variant.endswith("True") else "conv")
    assert config["kwargs"]["num_classes"] == int(variant.split("classes")[1].split("_")[0])
    model = zoo.create_model(model_name or "sasa_resnet26_cifar", weights=str(out))
    assert model.bug_compatible
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    if variant.endswith("False") and "classes10" in variant:
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_leader_kwargs_hook_reads_stem_and_classes():
    assert leader_checkpoint_kwargs({"state_dict": {"module.init.0.emb_a": torch.zeros(64, 4),
                                                    "dense.weight": torch.zeros(100, 2048)}}) == \
        {"bug_compatible": True, "stem": "attention", "num_classes": 100}
