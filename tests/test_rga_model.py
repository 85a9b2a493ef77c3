"""RGA-S/C/SC ResNet-50: layout of the original (rga_sc_keys.json), head, modes, ImageNet backbone."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torchvision

import zoo
from conftest import fixture_dir
from zoo.layers.rga import RGA_Module
from zoo.models.rga import RGAResNet50

VARIANTS = [("rga_sc_resnet50", "rgasc_cuhk03", 767), ("rga_sc_resnet50", "rgasc_market1501", 751),
            ("rga_s_resnet50", "rgas_cuhk03", 767), ("rga_c_resnet50", "rgac_cuhk03", 767)]
TINY = dict(height=64, width=32, width_div=16, cha_ratio=2, spa_ratio=2, down_ratio=2)


@pytest.fixture(scope="module")
def original_layout():
    return json.loads((fixture_dir("rga") / "rga_sc_keys.json").read_text())


@pytest.mark.parametrize("name,variant,num_classes", VARIANTS)
def test_keys_shapes_and_counts_equal_the_original(original_layout, name, variant, num_classes):
    info = original_layout["variants"][variant]
    model = zoo.create_model(name, num_classes=num_classes)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")]
    assert ours == [tuple(entry) for entry in info["state_dict"]]  # same keys, same order, same shapes
    assert len(ours) == info["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    rga = sum(p.numel() for n, p in model.named_parameters() if ".rga_att" in n)
    assert rga == info["num_parameters_in_rga_modules"]
    assert sum(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.modules()) == \
        info["num_batchnorm_layers"]


def test_head_modes_and_test_feature():
    torch.manual_seed(0)
    model = RGAResNet50(num_classes=7, **TINY)
    assert model.cls.bias is None
    assert not model.feat_bn.bias.requires_grad and torch.all(model.feat_bn.bias == 0)
    assert torch.all(model.feat_bn.weight == 1)
    x = torch.randn(3, 3, 64, 32)
    model.train()
    feat_, feat, logits = model(x)
    assert feat_.shape == feat.shape == (3, 128) and logits.shape == (3, 7)
    # BN-neck in training mode normalises with batch statistics, bias stays 0
    torch.testing.assert_close(feat.mean(0), torch.zeros(128), atol=1e-5, rtol=0)
    (feat_.sum() + logits.sum()).backward()
    assert model.feat_bn.bias.grad is None and model.cls.weight.grad is not None
    model.eval()
    with torch.no_grad():
        pooled, after_bn = model.forward_embeddings(x)
        torch.testing.assert_close(model(x), pooled)  # default test feature: feat_ (before the BN-neck)
        torch.testing.assert_close(pooled, model.backbone(x).mean(dim=(2, 3)))
        bn = model.feat_bn
        torch.testing.assert_close(after_bn, (pooled - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight)
        model.test_feature = "feat"
        torch.testing.assert_close(model(x), after_bn)


def test_rga_modules_sit_after_each_stage_with_last_stride_one():
    model = RGAResNet50(num_classes=3, **TINY).eval()
    seen = []
    for k in range(1, 5):
        getattr(model.backbone, f"rga_att{k}").register_forward_hook(
            lambda m, i, o, k=k: seen.append((k, tuple(i[0].shape), m.in_spatial)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 32))
    # stage strides 4, 8, 16, 16 (last stride 1); in_spatial = (h/s)(w/s)
    assert seen == [(1, (1, 16, 16, 8), 128), (2, (1, 32, 8, 4), 32), (3, (1, 64, 4, 2), 8), (4, (1, 128, 4, 2), 8)]
    assert model.backbone.layer4[0].conv2.stride == (1, 1)
    assert model.backbone.layer4[0].downsample[0].stride == (1, 1)


def test_low_rank_and_direct_models_agree():
    torch.manual_seed(0)
    fast = RGAResNet50(num_classes=5, **TINY).double().eval()
    direct = RGAResNet50(num_classes=5, backend="reference", **TINY).double().eval()
    direct.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 64, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), direct(x), rtol=1e-10, atol=1e-10)


def test_fixed_input_size_and_bad_arguments():
    model = RGAResNet50(num_classes=5, **TINY).eval()
    with pytest.raises(ValueError, match="built for 64x32"):
        model(torch.randn(1, 3, 256, 128))
    with pytest.raises(ValueError, match="multiples of 16"):
        RGAResNet50(height=250, width=128)
    with pytest.raises(ValueError, match="test_feature"):
        RGAResNet50(test_feature="pool5", **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        RGAResNet50(num_classes=-1, **TINY)  # 0 is allowed: no classifier (timm's rule)
    with pytest.raises(TypeError, match="fixed by the variant"):
        zoo.create_model("rga_s_resnet50", use_channel=True)


def _legacy_torchvision_file(path, new_style=False):
    """A torchvision ResNet-50 ImageNet file: torch-0.4 style (legacy serialization, no
    num_batches_tracked, plain OrderedDict without _metadata) or the current zip style."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet50()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics to see them copied
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    if new_style:
        torch.save(reference.state_dict(), path)
    else:
        state = OrderedDict((k, v.clone()) for k, v in reference.state_dict().items()
                            if not k.endswith("num_batches_tracked"))
        torch.save(state, path, _use_new_zipfile_serialization=False)
    return reference.state_dict()


@pytest.mark.parametrize("new_style", [False, True], ids=["torch04_file", "current_file"])
def test_pretrained_backbone_from_a_local_torchvision_file(tmp_path, new_style):
    path = tmp_path / "resnet50-19c8e357.pth"
    reference = _legacy_torchvision_file(path, new_style)
    torch.manual_seed(2)
    model = zoo.create_model("rga_sc_resnet50", pretrained_backbone=str(path))
    torch.manual_seed(2)
    untouched = zoo.create_model("rga_sc_resnet50")
    state = model.backbone.state_dict()
    for key, value in reference.items():
        if key.startswith("fc."):
            assert key not in state
            continue
        if key.endswith("num_batches_tracked"):
            assert state[key].item() == 0 and state[key].dtype == torch.int64
            continue
        assert torch.equal(state[key], value), key
    # the RGA modules and the head keep their initialisation
    for key, value in untouched.state_dict().items():
        if ".rga_att" in key or key.startswith(("feat_bn", "cls")):
            assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_backbone_rejects_a_non_resnet_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(zoo.errors.ZooError):
        RGAResNet50(pretrained_backbone=str(path))


def test_module_default_init_is_pytorchs():
    """Spec §3: no custom init in the RGA modules (both helpers of the original are never called)."""
    torch.manual_seed(0)
    model = RGAResNet50(num_classes=5, **TINY)
    module = model.backbone.rga_att2
    assert isinstance(module, RGA_Module)
    conv = module.gg_spatial[0].weight
    bound = 1 / conv[0].numel() ** 0.5
    assert conv.abs().max() <= bound  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert torch.all(module.gg_spatial[1].weight == 1)
    assert model.cls.weight.std().item() == pytest.approx(0.001, rel=0.2)


def test_legacy_init_draws_rga_batchnorm_weights_uniformly():
    torch.manual_seed(0)
    model = RGAResNet50(num_classes=5, legacy_init=True, **TINY)
    weights = torch.cat([m.weight for n, m in model.backbone.named_modules()
                         if n.startswith("rga_att") and isinstance(m, torch.nn.BatchNorm2d)])
    assert 0 <= weights.min() and weights.max() <= 1 and weights.std() > 0.1
    assert torch.all(model.backbone.bn1.weight == 1) and torch.all(model.feat_bn.weight == 1)
