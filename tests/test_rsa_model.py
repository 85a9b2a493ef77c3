"""RSANet-R50: keys of the original checkpoint, input layouts, head, conversion of both namings."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

import zoo
from conftest import fixture_dir
from zoo.convert import convert_state_dict, load_checkpoint
from zoo.models.rsanet import RSANet, kwargs_from_checkpoint

# A reduced RSANet (RSA in one block of every stage, 2 heads, channels / 8): small enough to run.
SMALL = dict(layers=(1, 2, 2, 2), width_div=8, rsa_positions=((0,), (1,), (1,), (1,)), nh=2, stochastic_depth=0.0)
INTERNAL = {"H1": "E_conv", "H2": "E_feat", "G": "E_feat_2", "P1": "weight_b", "I": "weight_a"}


def _keys_json():
    return json.loads((fixture_dir("rsa") / "rsanet_r50_keys.json").read_text())


@pytest.fixture(scope="module")
def r50():
    """The full RSANet-R50, built once (no forward at full size)."""
    torch.manual_seed(0)
    return zoo.create_model("rsanet_r50", num_classes=174, num_segments=8)


def test_r50_state_dict_equals_original_checkpoint_layout(r50):
    expected = [(k, list(shape), dtype) for k, shape, dtype in _keys_json()["state_dict"]]
    ours = [("module." + k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in r50.state_dict().items()]
    assert ours == expected  # key set, order, shapes and dtypes
    assert sum(p.numel() for p in r50.parameters()) == _keys_json()["num_parameters"] == 22034302
    assert r50.rsa_blocks() == [b.replace("module.base_model.", "") for b in _keys_json()["rsa_blocks"]]
    rsa = r50.base_model.layer3[1].conv2
    assert (rsa.nh, rsa.dk, rsa.kernel_size, rsa.kernel_type, rsa.feat_type) == (8, 32, (5, 7, 7), "VplusR", "VplusR")
    # original init (spec §2.4): zero-init residual, xavier new_fc with zero bias
    assert float(r50.base_model.layer1[0].bn3.weight.detach().abs().sum()) == 0.0
    assert float(r50.new_fc.bias.detach().abs().sum()) == 0.0


def _fake_original_checkpoint(internal: bool) -> dict:
    """A main.py checkpoint dict with every key/shape of the fixture list (released or internal names)."""
    g = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for key, shape, dtype in _keys_json()["state_dict"]:
        if dtype == "int64":
            value = torch.tensor(7)
        elif key.endswith(".I"):
            value = torch.eye(shape[1])[None] + 0.05 * torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) * 0.1
        if internal:
            head, _, last = key.rpartition(".")
            if last in ("P1", "I"):
                key = f"{head}.{INTERNAL[last]}"
            for ours, theirs in (("H1", "E_conv"), ("H2", "E_feat"), ("G", "E_feat_2")):
                key = key.replace(f".conv2.{ours}.weight", f".conv2.{theirs}.weight")
        state[key] = value
    return {"epoch": 80, "arch": "C3D" if internal else "ResNet", "state_dict": state, "best_prec1": 53.986}


@pytest.mark.parametrize("internal", [False, True], ids=["released_names", "internal_names"])
def test_full_r50_conversion_keys(r50, internal):
    ckpt = _fake_original_checkpoint(internal)
    target = r50.state_dict()
    out = convert_state_dict(ckpt, "rsa", target)
    assert set(out) == set(target)
    assert all(out[k].shape == target[k].shape for k in target)
    original = _fake_original_checkpoint(False)["state_dict"]
    for key in target:  # every tensor ends up under the released name it came from
        assert torch.equal(out[key], original["module." + key]), key
    assert kwargs_from_checkpoint(ckpt) == {"num_classes": 174}


def _randomise(model: RSANet, seed: int = 1) -> RSANet:
    """Random BN statistics/affine (bn3 is zero-initialised, which would silence every block) and P1/I."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
        for name, p in model.named_parameters():
            if name.endswith(".P1"):
                p.normal_(0, 0.5, generator=g)
            elif name.endswith(".I"):
                p.copy_(torch.eye(p.shape[1])[None] + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save_like_main_py(state: dict, path, internal: bool) -> None:
    """torch.save of main.py's container: zip format, 'module.' keys, storages tagged cuda:0 (spec §3)."""
    import torch.serialization as ser

    sd = OrderedDict()
    for key, value in state.items():
        parts = key.split(".")
        if internal and len(parts) > 3 and parts[-2] == "conv2" and parts[-1] in ("P1", "I"):
            parts[-1] = INTERNAL[parts[-1]]
        elif internal and len(parts) > 3 and parts[-3] == "conv2" and parts[-2] in ("H1", "H2", "G"):
            parts[-2] = INTERNAL[parts[-2]]
        sd["module." + ".".join(parts)] = value.clone()

    def cuda_tag(storage):  # what a CUDA tensor's storage records; a CPU-only load needs map_location
        return "cuda:0"

    ser.register_package(1, cuda_tag, lambda obj, location: None)
    try:
        torch.save({"epoch": 80, "arch": "C3D", "state_dict": sd, "best_prec1": 53.986}, path)
    finally:
        ser._package_registry[:] = [entry for entry in ser._package_registry if entry[1] is not cuda_tag]


@pytest.mark.parametrize("internal", [False, True], ids=["released_names", "internal_names"])
def test_convert_cli_reproduces_logits(tmp_path, internal):
    torch.manual_seed(0)
    original = _randomise(RSANet(num_classes=174, num_segments=8, **SMALL))
    x = torch.randn(2, 3 * 8, 32, 32)
    with torch.no_grad():
        expected = original(x)
    src = tmp_path / "resnet_rgb_model_best.pth.tar"
    _save_like_main_py(original.state_dict(), src, internal)
    with pytest.raises(RuntimeError):  # really tagged as CUDA storages, as the released files
        torch.load(src, weights_only=True)
    ckpt = load_checkpoint(src)
    keys = list(ckpt["state_dict"])
    assert all(k.startswith("module.") for k in keys)
    assert any(".E_conv." in k for k in keys) == internal

    from zoo.cli import main

    out = tmp_path / "converted"
    assert main(["convert", "--from", "rsa", str(src), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    model = zoo.create_model("rsanet_r50", weights=str(out), num_classes=174, num_segments=8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_input_layouts_and_head():
    torch.manual_seed(0)
    model = _randomise(RSANet(num_classes=10, num_segments=4, **SMALL))
    clip = torch.randn(2, 3, 4, 32, 32)
    stacked = clip.transpose(1, 2).reshape(2, 12, 32, 32)  # channel 3 t + c, the original's layout
    with torch.no_grad():
        a, b = model(clip), model(stacked)
        torch.testing.assert_close(a, b)
        assert a.shape == (2, 10)
        # per-frame classifier (Conv1d) then mean over frames
        feats = model.base_model.forward_features(clip).mean(dim=(3, 4))  # (B, C, T)
        per_frame = torch.einsum("kc,bct->bkt", model.new_fc.weight[:, :, 0], feats) + model.new_fc.bias[:, None]
        torch.testing.assert_close(a, per_frame.mean(2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_segments"):
        model(torch.randn(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="num_segments"):
        model(torch.randn(1, 15, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3T, H, W\)"):
        model(torch.randn(3, 32, 32))


def test_rsa_mixes_frames_only_through_rsa():
    """Backbone convs have temporal size 1: with the RSA blocks' branch silenced frames stay separate."""
    model = RSANet(num_classes=5, num_segments=4, **SMALL).eval()
    x = torch.randn(1, 3, 4, 32, 32, requires_grad=True)
    out = model.base_model.forward_features(x)
    out[:, :, 0].sum().backward()
    # zero-initialised bn3 silences every residual branch, RSA included: frame 0 sees only frame 0
    assert float(x.grad[:, :, 1:].abs().sum()) == 0.0
    model = _randomise(model)
    x.grad = None
    model.base_model.forward_features(x)[:, :, 0].sum().backward()
    assert float(x.grad[:, :, 1:].abs().sum()) > 0.0  # the RSA layers (temporal kernel 5) mix frames


def test_registry_and_config():
    assert {"rsanet_r50", "rsanet_r50_ssv1_16f", "rsanet_r50_ssv2_16f"} <= set(zoo.list_models("rsanet*"))
    rows = {(r.dataset, r.metric): r.value for name in ("rsanet_r50_ssv1_16f", "rsanet_r50_ssv2_16f")
            for r in zoo.model_info(name).reported}
    assert rows == {("ssv1", "top1"): 54.0, ("ssv1", "top5"): 81.1, ("ssv2", "top1"): 66.0, ("ssv2", "top5"): 89.9}
    for name in ("rsanet_r50_ssv1_16f", "rsanet_r50_ssv2_16f"):
        info = zoo.model_info(name)
        assert info.kwargs == {"num_classes": 174, "num_segments": 16}
        assert info.eval["protocol"] == "ssv" and "drive.google.com/drive/folders/" in info.notes


def test_imagenet_backbone_skips_rsa_blocks(tmp_path):
    """pretrained_backbone: 2D ImageNet kernels inflated into the non-RSA blocks; RSA blocks untouched."""
    from zoo.models.resnet import ResNet

    torch.manual_seed(0)
    imagenet = ResNet(layers=SMALL["layers"], width_div=8, num_classes=1000)  # torchvision key names
    src = tmp_path / "resnet.pth"
    torch.save(imagenet.state_dict(), src)
    torch.manual_seed(1)
    model = RSANet(num_classes=5, num_segments=4, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_imagenet_backbone(str(src))
    after = model.state_dict()
    inet = imagenet.state_dict()
    for key, value in after.items():
        if not key.startswith("base_model."):
            torch.testing.assert_close(value, before[key])
            continue
        inner = key[len("base_model."):]
        if inner.startswith(tuple(f"{b}." for b in model.rsa_blocks())):
            torch.testing.assert_close(value, before[key])  # RSA blocks keep their random init
        elif inner in inet and not inner.endswith("num_batches_tracked"):
            ref = inet[inner]
            torch.testing.assert_close(value, ref.unsqueeze(2) if ref.dim() == 4 else ref)
