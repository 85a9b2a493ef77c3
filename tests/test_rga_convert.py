"""`--from rga`: original training checkpoints (checkpoint_<epoch>.pth.tar, spec rga §4) -> our model.

No trained RGA checkpoint exists, so the test writes one in the original's exact format: a dict
{state_dict, epoch, best_top1, optimizer}, torch 0.4.0 style (legacy serialization, CUDA storage
location tags, plain OrderedDict without _metadata, no num_batches_tracked), with the key list of
rga_sc_keys.json. Its rga_att3 module holds the weights of the rga_sc_stage3 fixture, so the
converted network is checked against the original's own numbers there, and end to end against an
independent reference (torchvision's ResNet-50 with last stride 1 + the module's direct form +
the BN-neck head written out).
"""
from __future__ import annotations

import json
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torchvision

import zoo
from conftest import fixture_dir, load_case
from zoo.cli import main as cli_main
from zoo.checkpoint import load_checkpoint
from zoo.factory import convert_checkpoint
from zoo.errors import ConversionError
from zoo.layers.rga import RGA_Module
from zoo.models.rga import kwargs_from_checkpoint


@contextmanager
def _cuda_location_tags():
    """Make torch.save record every storage as 'cuda:0', as a GPU run of torch 0.4.0 did.

    The legacy pickle stores (storage type, key, location tag, size) per storage; the location
    tag is the only trace of CUDA in the file, so emulating it needs no GPU."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def _layout(variant):
    return json.loads((fixture_dir("rga") / "rga_sc_keys.json").read_text())["variants"][variant]


def write_original_checkpoint(path: Path, variant: str, num_classes: int, seed: int = 0) -> OrderedDict:
    """A checkpoint_<epoch>.pth.tar as main_imgreid.py wrote it; returns its state_dict."""
    gen = torch.Generator().manual_seed(seed)
    state = OrderedDict()  # a fresh OrderedDict: no _metadata attribute, as torch 0.4.0 wrote it
    for key, shape, dtype in _layout(variant)["state_dict"]:
        assert dtype == "float32"
        if key == "cls.weight":
            assert shape == [num_classes, 2048]
            value = 0.001 * torch.randn(shape, generator=gen)
        elif len(shape) == 4:  # conv: He-scaled so activations stay O(1) through 16 blocks
            value = torch.randn(shape, generator=gen) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith(".weight"):  # BN: torch 0.4.0 drew the RGA modules' from U(0, 1)
            value = torch.rand(shape, generator=gen) if ".rga_att" in key else 0.2 + 0.4 * torch.rand(shape, generator=gen)
        elif key == "feat_bn.bias":
            value = torch.zeros(shape)  # frozen at 0
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        state[key] = value
    if variant.startswith("rgasc"):
        # rga_att3 (C=1024, N=128 at 256x128) is exactly the size of the rga_sc_stage3 fixture
        _, tensors = load_case("rga", "rga_sc_stage3")
        for key, value in tensors.items():
            if key.startswith("state."):
                state["backbone.rga_att3." + key[len("state."):]] = value.clone()
    params = [k for k in state if not k.endswith(("running_mean", "running_var")) and k != "feat_bn.bias"]
    ids = {k: 140000000000000 + 8 * i for i, k in enumerate(params)}  # 0.4.0 keyed state by id(param)
    adam = {"lr": 8e-6, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.0005, "amsgrad": False, "lr_mult": 1.0}
    optimizer = {
        "state": {ids[k]: {"step": 600 * 115, "exp_avg": torch.zeros_like(state[k]), "exp_avg_sq": torch.ones_like(state[k])}
                  for k in ("feat_bn.weight", "cls.weight")},  # a few entries: the converter must ignore them all
        "param_groups": [{**adam, "params": [ids[k] for k in params if k.startswith("backbone.")]},
                         {**adam, "params": [ids["feat_bn.weight"], ids["cls.weight"]]}],
    }
    checkpoint = {"state_dict": state, "epoch": 600, "best_top1": 0, "optimizer": optimizer}
    with _cuda_location_tags():
        torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return state


@pytest.fixture(scope="module")
def cuhk03_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rga_logs")
    path = folder / "checkpoint_600.pth.tar"
    state = write_original_checkpoint(path, "rgasc_cuhk03", 767)
    return path, state


def test_checkpoint_is_in_the_original_format(cuhk03_checkpoint):
    path, state = cuhk03_checkpoint
    assert not zipfile.is_zipfile(path)  # legacy (pre-1.6) serialization
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the storages really are tagged as CUDA ones
            torch.load(path, weights_only=True)
    checkpoint = load_checkpoint(path)
    assert set(checkpoint) == {"state_dict", "epoch", "best_top1", "optimizer"}
    assert not hasattr(checkpoint["state_dict"], "_metadata")
    assert not any(k.endswith("num_batches_tracked") for k in checkpoint["state_dict"])
    assert all(v.device.type == "cpu" for v in checkpoint["state_dict"].values())


def _reference_network(state: OrderedDict):
    """Independent reference: torchvision ResNet-50 (layer4 stride 1), RGA modules in the direct
    (original) form, BN-neck and classifier written out. float64. Returns f(x) -> (feat_, feat, logits)."""
    backbone = torchvision.models.resnet50()
    backbone.layer4[0].conv2.stride = (1, 1)
    backbone.layer4[0].downsample[0].stride = (1, 1)
    plain = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.") and ".rga_att" not in k
             and not k.startswith("backbone.rga_att")}
    missing, unexpected = backbone.load_state_dict(plain, strict=False)
    assert not unexpected and all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in missing)
    sizes = [(256, 64 * 32), (512, 32 * 16), (1024, 16 * 8), (2048, 16 * 8)]
    modules = []
    for k, (c, n) in enumerate(sizes, start=1):
        module = RGA_Module(c, n, backend="reference")
        prefix = f"backbone.rga_att{k}."
        missing, unexpected = module.load_state_dict(
            {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}, strict=False)
        assert not unexpected and all(key.endswith("num_batches_tracked") for key in missing)
        modules.append(module)
    backbone, modules = backbone.double().eval(), [m.double().eval() for m in modules]
    bn = {k: state["feat_bn." + k].double() for k in ("weight", "bias", "running_mean", "running_var")}
    cls = state["cls.weight"].double()

    def forward(x):
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        for layer, module in zip([backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4], modules):
            x = module(layer(x))
        feat_ = x.mean(dim=(2, 3))
        feat = (feat_ - bn["running_mean"]) / torch.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
        return feat_, feat, feat @ cls.t()

    return forward, modules[2]


def test_cli_convert_then_create_model_reproduces_the_original_network(cuhk03_checkpoint, tmp_path):
    path, state = cuhk03_checkpoint
    out = tmp_path / "rga_sc_cuhk03"
    # `python -m zoo convert --from rga SRC --out DIR`, run in this process (same entry point, no
    # second interpreter start: this machine is shared)
    assert cli_main(["convert", "--from", "rga", str(path), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "rga_sc_resnet50" and config["kwargs"]["num_classes"] == 767

    model = zoo.create_model("rga_sc_resnet50", weights=str(out), num_classes=767)
    assert not model.training
    converted = model.state_dict()
    # keys and shapes equal the original layout (plus the int64 num_batches_tracked we add)
    layout = [(k, list(v.shape)) for k, v in converted.items() if not k.endswith("num_batches_tracked")]
    assert layout == [(k, s) for k, s, _ in _layout("rgasc_cuhk03")["state_dict"]]
    nbt = [v for k, v in converted.items() if k.endswith("num_batches_tracked")]
    assert len(nbt) == 102 and all(v.dtype == torch.int64 and v.item() == 0 for v in nbt)
    for key, value in state.items():
        assert torch.equal(converted[key], value), key

    # the converted rga_att3 is the original module of the fixture: its numbers come out
    meta, tensors = load_case("rga", "rga_sc_stage3")
    with torch.no_grad():
        out3, spatial, channel = model.backbone.rga_att3.forward_with_logits(tensors["input"])
    torch.testing.assert_close(out3, tensors["output"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(channel, tensors["channel_logits"], rtol=1e-4, atol=1e-4)

    # the whole network equals the independent reference, features and logits
    reference, _ = _reference_network(state)
    x = torch.randn(1, 3, 256, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        ref_feat_, ref_feat, ref_logits = reference(x)
        feat_, feat = model.forward_embeddings(x)
        logits = model.cls(feat)
        eval_output = model(x)
    for ours, ref in ((feat_, ref_feat_), (feat, ref_feat), (logits, ref_logits)):
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-7 * ref.abs().max().item())
    torch.testing.assert_close(eval_output, ref_feat_, rtol=1e-7, atol=1e-7 * ref_feat_.abs().max().item())


@pytest.mark.parametrize("name,variant,num_classes", [("rga_s_resnet50", "rgas_cuhk03", 767),
                                                      ("rga_c_resnet50", "rgac_cuhk03", 767)])
def test_other_variants_convert_strictly(tmp_path, name, variant, num_classes):
    src = tmp_path / "checkpoint_320.pth.tar"
    state = write_original_checkpoint(src, variant, num_classes, seed=1)
    out = convert_checkpoint(src, "rga", tmp_path / "out", model_name=name)
    config = json.loads((out / "config.json").read_text())
    assert config["kwargs"] == {"num_classes": num_classes}  # read from cls.weight
    converted = load_checkpoint(out / "model.safetensors")
    assert {k for k in converted if not k.endswith("num_batches_tracked")} == set(state)
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    assert sum(k.endswith("num_batches_tracked") for k in converted) == _layout(variant)["num_batchnorm_layers"]


def test_market1501_checkpoint_gives_751_classes():
    """A Market-1501 checkpoint differs from a CUHK03 one only in cls.weight (rga_sc_keys.json);
    the map reads num_classes from it (the full layout is checked in test_rga_model.py)."""
    cuhk03, market = _layout("rgasc_cuhk03")["state_dict"], _layout("rgasc_market1501")["state_dict"]
    assert [e for e in cuhk03 if e[0] != "cls.weight"] == [e for e in market if e[0] != "cls.weight"]
    assert dict((k, s) for k, s, _ in market)["cls.weight"] == [751, 2048]
    checkpoint = {"state_dict": OrderedDict([("cls.weight", torch.zeros(751, 2048))]), "epoch": 600}
    assert kwargs_from_checkpoint(checkpoint) == {"num_classes": 751}


def test_variant_is_detected_and_a_wrong_one_reported_with_the_model_to_use(tmp_path):
    src = tmp_path / "checkpoint_600.pth.tar"
    write_original_checkpoint(src, "rgas_cuhk03", 767)
    out = convert_checkpoint(src, "rga", tmp_path / "out")  # no --model: the keys say RGA-S
    assert json.loads((out / "config.json").read_text())["model"] == "rga_s_resnet50"
    with pytest.raises(ConversionError, match="--model rga_s_resnet50"):
        convert_checkpoint(src, "rga", tmp_path / "wrong", model_name="rga_sc_resnet50")
