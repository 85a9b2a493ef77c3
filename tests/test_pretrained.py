"""timm's conventions on every model: ``pretrained_cfg``, new heads and inputs on pretrained weights,
the classifier API and backbones (``features_only``), on the five minis (with their committed weights)
and on random-init full-size models of every family (built once for the module, small inputs)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import zoo
from zoo.config import PretrainedCfg
from zoo.data.labels import LABEL_SETS
from zoo.errors import ConversionError, WeightsError
from zoo.models._features import FeatureListNet
from zoo.registry import model_info

MINIS = ["detr_irpe_mini", "handraise_rpa_mini", "rga_sc_mini", "rsanet_mini", "sasa_resnet_mini"]
#: label set each mini's weights record (re-id has none)
MINI_LABELS = {"detr_irpe_mini": "shapes-det", "handraise_rpa_mini": "raised-hands", "rga_sc_mini": None,
               "rsanet_mini": "moving-shapes", "sasa_resnet_mini": "shapes-cls"}
#: a small input of each mini (re-id and RGA are built for one size; the video mini takes 8 frames)
MINI_INPUTS = {"detr_irpe_mini": (3, 64, 80), "handraise_rpa_mini": (3, 64, 80), "rga_sc_mini": (3, 64, 32),
               "rsanet_mini": (24, 48, 48), "sasa_resnet_mini": (3, 64, 64)}
#: random-init full-size models, one family each (and DeiT), with the kwargs that keep their inputs small
FULL = {"detr_r50_irpe": {}, "deit_tiny_patch16_224_ctx_product_50_shared_k": {}, "rga_sc_resnet50": {},
        "rsanet_r50": {"num_segments": 2}, "sasa_resnet26": {}, "handraise_rcnn_r50_fpn_rpa_position": {}}
CLASSIFIERS = ["rga_sc_mini", "rsanet_mini", "sasa_resnet_mini"]  # minis with the classifier API's pooled head


@pytest.fixture(scope="module")
def minis():
    """Each mini with its committed weights, in eval mode."""
    return {name: zoo.create_model(name, pretrained=True) for name in MINIS}


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    return {name: zoo.create_model(name, **kwargs).eval() for name, kwargs in FULL.items()}


def _input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, *MINI_INPUTS[name], generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# pretrained_cfg


@pytest.mark.parametrize("name", MINIS)
def test_pretrained_cfg_of_every_mini(minis, name):
    model, cfg = minis[name], model_info(name)
    entry = cfg.weights_entry()
    pre = model.pretrained_cfg
    assert isinstance(pre, PretrainedCfg) and model.default_cfg is pre
    assert (pre.architecture, pre.tag, pre.source, pre.sha256) == (name, entry.tag, entry.source, entry.sha256)
    assert pre.num_classes == cfg.kwargs["num_classes"] and pre.task == cfg.task and pre.family == cfg.family
    expected = LABEL_SETS[MINI_LABELS[name]] if MINI_LABELS[name] else None
    assert pre.label_names == expected
    assert pre.preprocessing == cfg.preprocessing
    assert list(pre.reported) == cfg.reported_for(entry.tag) and pre.reported
    assert pre.license == "unknown" and pre.paper == cfg.paper
    # timm's key names, read as a mapping (what timm.data.resolve_data_config reads)
    if cfg.preprocessing.input_size:
        assert pre.get("input_size") == (3, *cfg.preprocessing.input_size)
    assert pre.get("interpolation") == "bilinear" and pre.get("mean") == cfg.preprocessing.mean
    assert pre["num_classes"] == pre.num_classes and "test_input_size" not in pre


def test_label_names_of_the_minis_are_the_datasets_names():
    from zoo.data.synthetic import CLS_CLASSES, DET_CATEGORIES, VIDEO_CLASSES

    assert LABEL_SETS["shapes-det"] == ("N/A", *[c["name"] for c in DET_CATEGORIES])
    assert LABEL_SETS["raised-hands"] == ("background", "hand-raising")
    assert LABEL_SETS["shapes-cls"] == tuple(CLS_CLASSES) and LABEL_SETS["moving-shapes"] == tuple(VIDEO_CLASSES)
    assert LABEL_SETS["coco"][1] == "person" and len(LABEL_SETS["coco"]) == 91 and len(LABEL_SETS["imagenet"]) == 1000


def test_every_weights_entry_has_label_names_that_fit_its_classes():
    for name in zoo.list_models():
        cfg = model_info(name)
        for entry in cfg.weights.values():
            names = zoo.data.label_names(entry.label_names)
            if cfg.task == "person re-identification":
                assert names is None, f"{name}.{entry.tag}: re-id weights have no classes"
            else:
                assert names is not None and len(names) == cfg.kwargs["num_classes"], f"{name}.{entry.tag}"


@pytest.mark.parametrize("name", list(FULL))
def test_random_init_models_carry_the_configs_values_without_weights_fields(full, name):
    pre, cfg = full[name].pretrained_cfg, model_info(name)
    assert (pre.tag, pre.source, pre.sha256, pre.label_names) == (None, None, None, None)
    assert pre.preprocessing == cfg.preprocessing and pre.task == cfg.task and pre.paper == cfg.paper
    assert pre.model_kwargs == {**cfg.kwargs, **FULL[name]}
    assert list(pre.reported) == cfg.reported_for(None)


# ---------------------------------------------------------------------------------------------
# New heads and inputs on pretrained weights


def _classifier_prefix(model) -> str:
    return next(n for n, m in model.named_modules() if m is model.get_classifier()) + "."


@pytest.mark.parametrize("name", MINIS)
def test_num_classes_reinitialises_only_the_classifier(minis, name, caplog):
    base = minis[name]
    new = 7 if name != "handraise_rpa_mini" else 3
    with caplog.at_level(logging.WARNING, logger="zoo.factory"):
        model = zoo.create_model(name, pretrained=True, num_classes=new)
    prefix = _classifier_prefix(model)
    dropped = [k for k in base.state_dict() if k.startswith(prefix)]
    assert dropped and all(k in caplog.text for k in dropped)  # said once, naming the keys
    assert len([r for r in caplog.records if "re-initialised" in r.getMessage()]) == 1
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            assert value.shape != base.state_dict()[key].shape or key.endswith("bias")
        else:
            assert torch.equal(value, base.state_dict()[key]), key
    assert model.pretrained_cfg.num_classes == new and model.pretrained_cfg.label_names is None
    assert model.pretrained_cfg.reported == ()  # the weights' numbers are not this head's


def test_num_classes_changes_the_outputs_of_every_task(minis):
    with torch.no_grad():
        detr = zoo.create_model("detr_irpe_mini", pretrained=True, num_classes=6)
        assert detr([_input("detr_irpe_mini", 1)[0]])["pred_logits"].shape[-1] == 7  # + no-object
        hands = zoo.create_model("handraise_rpa_mini", pretrained=True, num_classes=3)
        assert hands.roi_heads.box_predictor.bbox_pred.out_features == 12
        for name in CLASSIFIERS:
            model = zoo.create_model(name, pretrained=True, num_classes=5)
            if name == "rga_sc_mini":
                assert model.forward_head(model.forward_features(_input(name))).shape == (2, 5)
            else:
                assert model(_input(name)).shape == (2, 5)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_num_classes_zero_returns_pooled_features(minis, name, caplog):
    with caplog.at_level(logging.WARNING, logger="zoo.factory"):
        model = zoo.create_model(name, pretrained=True, num_classes=0)
    assert "num_classes=0: the model has no classifier" in caplog.text and "re-initialised" not in caplog.text
    with torch.no_grad():
        pooled = model(_input(name))
        assert pooled.shape == (2, minis[name].num_features)
        if name != "rga_sc_mini":  # re-id returns its test feature either way
            expected = minis[name].forward_head(minis[name].forward_features(_input(name)), pre_logits=True)
            torch.testing.assert_close(pooled, expected)


def test_strict_loading_stays_strict_for_every_other_key():
    with pytest.raises(ConversionError, match="mis-shaped"):
        zoo.create_model("sasa_resnet_mini", pretrained=True, num_classes=5, kernel_size=3)


@pytest.mark.parametrize("name,first", [("sasa_resnet_mini", "stem.0.query.weight"), ("rga_sc_mini", "backbone.conv1.weight"),
                                        ("rsanet_mini", "base_model.conv1.weight"),
                                        ("detr_irpe_mini", "backbone.0.body.conv1.weight"),
                                        ("handraise_rpa_mini", "backbone.body.conv1.weight")])
@pytest.mark.parametrize("in_chans", [1, 5])
def test_in_chans_adapts_the_first_convolution(minis, name, first, in_chans):
    rgb = minis[name].state_dict()[first]
    model = zoo.create_model(name, pretrained=True, in_chans=in_chans)
    weight = model.state_dict()[first]
    if in_chans == 1:  # timm's rule: the sum over R, G, B
        expected = rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]
    else:  # repeated over the channels, scaled by 3 / in_chans
        expected = torch.cat([rgb, rgb], dim=1)[:, :in_chans] * (3 / in_chans)
    torch.testing.assert_close(weight, expected)
    assert model.pretrained_cfg.in_chans == in_chans and model.pretrained_cfg.input_size in (None, (in_chans,) + tuple(
        model.pretrained_cfg.preprocessing.input_size or ()))
    frames = 8 if name == "rsanet_mini" else 1
    x = torch.rand(1, in_chans * frames, *MINI_INPUTS[name][1:])
    with torch.no_grad():
        out = model(list(x)) if name in ("detr_irpe_mini", "handraise_rpa_mini") else model(x)
    assert out is not None


# ---------------------------------------------------------------------------------------------
# The classifier API


_API_INPUTS = {"deit_tiny_patch16_224_ctx_product_50_shared_k": (3, 224, 224), "rsanet_r50": (6, 32, 32),
               "sasa_resnet26": (3, 32, 32), "rpa_cifar_toy": (3, 32, 32), "sasa_resnet26_cifar": (3, 32, 32),
               **MINI_INPUTS}


@pytest.mark.parametrize("name", [*CLASSIFIERS, "deit_tiny_patch16_224_ctx_product_50_shared_k", "rsanet_r50",
                                  "sasa_resnet26", "rpa_cifar_toy", "sasa_resnet26_cifar"])
def test_classifier_api(minis, full, name):
    """Every classification, re-id and video model: forward_features, forward_head, get/reset_classifier."""
    if name in minis:
        model = zoo.create_model(name, pretrained=True)  # the module's minis stay as loaded
    else:
        model = full[name] if name in full else zoo.create_model(name).eval()
    x = torch.rand(1, *_API_INPUTS[name], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pre = model.forward_head(features, pre_logits=True)
        if name != "rga_sc_mini":  # re-id's forward in eval mode is its test feature
            torch.testing.assert_close(model(x), logits)
    assert isinstance(model.get_classifier(), torch.nn.Module)
    assert pre.shape == (1, model.num_features) and logits.shape == (1, model.num_classes)
    # a new classifier on the same features (only the head changes)
    model.reset_classifier(3)
    with torch.no_grad():
        assert model.forward_head(features).shape == (1, 3) and model.num_classes == 3
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(features), pre)


def test_rga_full_size_classifier_api_on_its_feature_map(full):
    model = full["rga_sc_resnet50"]
    features = torch.rand(2, 2048, 16, 8)
    with torch.no_grad():
        assert model.forward_head(features).shape == (2, 767)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), model.feat_bn(features.mean((2, 3))))
    assert model.get_classifier() is model.cls


def test_global_pool_is_accepted_where_the_model_has_one(minis):
    x = _input("sasa_resnet_mini")
    with torch.no_grad():
        avg = minis["sasa_resnet_mini"].forward_head(minis["sasa_resnet_mini"].forward_features(x), pre_logits=True)
        peak = zoo.create_model("sasa_resnet_mini", pretrained=True, global_pool="max")
        features = peak.forward_features(x)
        torch.testing.assert_close(peak.forward_head(features, pre_logits=True), features.amax((2, 3)))
        assert not torch.allclose(avg, features.amax((2, 3)))
        deit = zoo.create_model("deit_tiny_patch16_224_ctx_product_50_shared_k", img_size=32, depth=1, global_pool="avg")
        tokens = deit.forward_features(torch.rand(1, 3, 32, 32))
        torch.testing.assert_close(deit.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
        rsa = zoo.create_model("rsanet_mini", global_pool="avgmax")
        frames = torch.rand(2, 256, 8, 2, 2)  # layer4's map (B, C, T, h, w): each frame pooled
        torch.testing.assert_close(rsa.forward_head(frames, pre_logits=True),
                                   (0.5 * (frames.amax((3, 4)) + frames.mean((3, 4)))).mean(2))
    with pytest.raises(ValueError, match="global_pool"):
        zoo.create_model("sasa_resnet_mini", global_pool="median")
    with pytest.raises(ValueError, match="num_classes=0"):
        zoo.create_model("sasa_resnet_mini", global_pool="")
    unpooled = zoo.create_model("sasa_resnet_mini", pretrained=True, num_classes=0, global_pool="")
    with torch.no_grad():
        assert unpooled(x).shape == (2, 256, 2, 2)


# ---------------------------------------------------------------------------------------------
# Backbones


def _check_maps(model, x) -> list[torch.Tensor]:
    with torch.no_grad():
        maps = model(x)
    info = model.feature_info
    assert len(maps) == len(info) == len(model.out_indices)
    height = x.shape[-2] if isinstance(x, torch.Tensor) else x[0].shape[-2]
    for fmap, channels, reduction in zip(maps, info.channels(), info.reduction()):
        assert fmap.shape[1] == channels
        assert fmap.shape[-2] == -(-height // reduction), (fmap.shape, reduction)  # ceil: padded convolutions
    return maps


@pytest.mark.parametrize("name", MINIS)
def test_features_only_with_pretrained_weights(minis, name):
    model = zoo.create_model(name, pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
    assert isinstance(model, FeatureListNet) and not model.training
    x = _input(name) if name not in ("detr_irpe_mini", "handraise_rpa_mini") else torch.rand(2, 3, 64, 96)
    maps = _check_maps(model, x)
    assert model.feature_info.channels() == [32, 64, 128, 256]
    # the backbone holds the pretrained weights, and no head
    full_state = minis[name].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, full_state[key[len("model."):]]), key
    assert not any(key.startswith(model.pruned) for key in model.state_dict())
    assert model.pretrained_cfg.model_kwargs["features_only"] is True
    assert len(maps) == 4


_FULL_FEATURE_INPUTS = {"detr_r50_irpe": (3, 64, 64), "sasa_resnet26": (3, 32, 32), "rsanet_r50": (6, 32, 32),
                        "handraise_rcnn_r50_fpn_rpa_position": (3, 64, 64),
                        "deit_tiny_patch16_224_ctx_product_50_shared_k": (3, 224, 224)}


@pytest.mark.parametrize("name", list(_FULL_FEATURE_INPUTS))
def test_features_only_of_the_full_size_models(full, name):
    model = FeatureListNet(copy.deepcopy(full[name]), out_indices=(-2, -1))  # what features_only=True builds
    _check_maps(model, torch.rand(1, *_FULL_FEATURE_INPUTS[name]))
    if name != "deit_tiny_patch16_224_ctx_product_50_shared_k":
        assert model.feature_info.channels() == [1024, 2048]
        assert model.feature_info.reduction() == [16, 32]
    else:
        assert model.feature_info.channels() == [192, 192] and model.feature_info.reduction() == [16, 16]
        assert model.feature_info.module_name() == ["blocks.10", "blocks.11"]


def test_features_only_of_the_full_size_rga():
    rga = zoo.create_model("rga_sc_resnet50", features_only=True)  # built for 256 x 128: its metadata only
    assert rga.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert rga.feature_info.reduction() == [2, 4, 8, 16, 16]  # last stride 1
    assert rga.feature_info.module_name()[1:] == [f"backbone.rga_att{k}" for k in range(1, 5)]


def test_features_only_rejects_bad_out_indices():
    with pytest.raises(ValueError, match="out_indices"):
        zoo.create_model("sasa_resnet_mini", features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="cannot be a backbone"):
        zoo.create_model("rpa_cifar_toy", features_only=True)


# ---------------------------------------------------------------------------------------------
# Weights tags


def test_a_mistyped_weights_tag_suggests_the_close_one():
    with pytest.raises(WeightsError, match="did you mean 'synthetic'"):
        zoo.create_model("sasa_resnet_mini", weights="syntetic")
    with pytest.raises(WeightsError, match="did you mean 'synthetic'"):
        zoo.create_model("sasa_resnet_mini.syntetic")
    with pytest.raises(WeightsError, match="not found"):  # a path-like miss stays a missing file
        zoo.create_model("sasa_resnet_mini", weights="no/such/file.safetensors")
