"""The conversion engine: safe loading, maps, num_batches_tracked, strict reports, converted folders."""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from zoo import convert
from zoo._fs import sha256_file
from zoo.checkpoint import load_checkpoint, load_into
from zoo.convert import ConversionMap, convert_state_dict, load_map, register_transform
from zoo.factory import convert_checkpoint
from zoo.errors import CheckpointError, ConfigError, ConversionError
from zoo.models.resnet import ResNet


def _no_nbt(state_dict):
    """torch 0.4.0 state dicts have no num_batches_tracked buffers."""
    return OrderedDict((k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))


def _tiny_resnet(**kw) -> ResNet:
    return ResNet(layers=(1, 1, 1, 1), width_div=16, **kw)


@pytest.fixture(scope="module")
def legacy_resnet50(tmp_path_factory):
    """torchvision's resnet50 saved like the 2017 ``resnet50-19c8e357.pth``: flat, legacy format, no num_batches_tracked."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics so a wrong mapping would show in the outputs
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50-19c8e357.pth"
    torch.save(_no_nbt(reference.state_dict()), path, _use_new_zipfile_serialization=False)
    return path, reference


def test_legacy_resnet50_is_legacy_format_without_num_batches_tracked(legacy_resnet50):
    path, _ = legacy_resnet50
    import zipfile

    assert not zipfile.is_zipfile(path)  # the pre-1.6 pickle container, as in 2017
    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint, dict) and len(checkpoint) == 267  # 320 entries today minus 53 num_batches_tracked
    assert not any(k.endswith("num_batches_tracked") for k in checkpoint)
    assert all(t.device.type == "cpu" for t in checkpoint.values())


def test_legacy_resnet50_converts_and_loads_strictly(legacy_resnet50, tmp_path):
    path, reference = legacy_resnet50
    model = ResNet(num_classes=1000)
    out = convert_checkpoint(path, "torchvision-resnet", tmp_path / "resnet50", model=model, model_name="resnet50")

    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temp folder was renamed away
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "resnet50" and config["converter"] == "torchvision-resnet"
    assert config["converter_version"] == load_map("torchvision-resnet").version
    assert config["source_sha256"] == sha256_file(path) and config["source"] == str(path)
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["library_name"] == "relzoo"

    from zoo.weights import load_state_dict

    state = load_state_dict(out)  # the folder, as create_model(name, weights=DIR) reads it
    fresh = ResNet(num_classes=1000)
    assert not load_into(fresh, state, strict=True)
    assert fresh.bn1.num_batches_tracked.dtype == torch.int64 and int(fresh.bn1.num_batches_tracked) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), reference(x), rtol=1e-4, atol=1e-5)


def test_backbone_without_head_drops_fc(legacy_resnet50):
    path, _ = legacy_resnet50
    backbone = ResNet(num_classes=None)
    state = convert_state_dict(load_checkpoint(path), load_map("torchvision-resnet"), target_state_dict=backbone.state_dict())
    assert not any(k.startswith("fc.") for k in state)
    assert not load_into(backbone, state)


def test_new_style_checkpoint_with_num_batches_tracked(tmp_path):
    source = _tiny_resnet(num_classes=10)
    path = tmp_path / "new.pth"
    torch.save(source.state_dict(), path)  # zip format, with num_batches_tracked
    state = convert_state_dict(load_checkpoint(path), "torchvision-resnet", _tiny_resnet(num_classes=10).state_dict())
    assert not load_into(_tiny_resnet(num_classes=10), state)


def test_training_container_with_module_prefix_args_and_numpy(tmp_path):
    source = _tiny_resnet(num_classes=10)
    container = {
        "epoch": 90,
        "arch": "resnet",
        "state_dict": OrderedDict((f"module.{k}", v) for k, v in _no_nbt(source.state_dict()).items()),
        "best_prec1": np.float64(76.1),
        "best_rank1": np.array([0.5, 0.25], dtype=np.float32),
        "args": argparse.Namespace(lr=0.1, arch="resnet50", gpus=[0, 1]),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
    }
    path = tmp_path / "checkpoint_320.pth.tar"
    torch.save(container, path, _use_new_zipfile_serialization=False)

    checkpoint = load_checkpoint(path)
    assert checkpoint["args"].arch == "resnet50" and float(checkpoint["best_prec1"]) == pytest.approx(76.1)
    target = _tiny_resnet(num_classes=10)
    state = convert_state_dict(checkpoint, load_map("torchvision-resnet"), target.state_dict())
    assert not load_into(target, state)
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)


def test_cuda_storages_are_mapped_to_cpu(tmp_path, monkeypatch):
    import torch.serialization as serialization

    monkeypatch.setattr(serialization, "location_tag", lambda storage: "cuda:0")  # as written on a GPU machine
    for name, zip_format in (("legacy.pth", False), ("zip.pth", True)):
        torch.save({"w": torch.arange(3.0)}, tmp_path / name, _use_new_zipfile_serialization=zip_format)
    monkeypatch.undo()
    for name in ("legacy.pth", "zip.pth"):
        tensor = load_checkpoint(tmp_path / name)["w"]
        assert tensor.device.type == "cpu" and tensor.tolist() == [0.0, 1.0, 2.0]


class _RunsCode:
    """Unpickling this would call ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_pickle_that_would_run_code_is_refused(tmp_path, zip_format, payload):
    marker = tmp_path / "marker"
    if payload == "os.system":
        evil, global_name = _RunsCode(os.system, f"touch {marker}"), "posix.system"
    else:
        evil, global_name = _RunsCode(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": evil}, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert f"'{global_name}'" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_strict_report_lists_missing_unexpected_and_misshaped_together():
    model = _tiny_resnet(num_classes=10)
    state = dict(model.state_dict())
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(3, 4)
    state["fc.weight"] = torch.zeros(5, 128)
    before = model.fc.bias.clone()
    state["fc.bias"] = torch.ones(10)

    with pytest.raises(ConversionError) as info:
        load_into(model, state)
    message = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert f"layer1.0.conv1.weight {list(model.layer1[0].conv1.weight.shape)}" in message
    assert "extra.weight [3, 4]" in message
    assert "fc.weight: weights [5, 128] vs model [10, 128]" in message
    torch.testing.assert_close(model.fc.bias, before)  # strict failure leaves the model untouched

    report = load_into(model, state, strict=False)  # loads what fits, still reports
    assert set(report.missing) == {"layer1.0.conv1.weight"} and set(report.unexpected) == {"extra.weight"}
    assert set(report.mismatched) == {"fc.weight"}
    torch.testing.assert_close(model.fc.bias, torch.ones(10))


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path, zip_format):
    path = tmp_path / "whole.pth"
    torch.save(_tiny_resnet().state_dict(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(cut)


def test_corrupt_empty_and_missing_files(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint at all")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name in ("garbage.pth", "empty.pth", "bad.safetensors", "missing.pth"):
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(tmp_path / name)


def test_safetensors_and_plain_pickle(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    assert load_checkpoint(tmp_path / "w.safetensors")["a"].tolist() == [1.0, 1.0]
    import pickle

    with open(tmp_path / "w.pkl", "wb") as f:  # e.g. detectron-style numpy weights
        pickle.dump({"blobs": {"conv.w": np.ones((2, 2), dtype=np.float32)}, "epoch": np.int64(3)}, f, protocol=2)
    loaded = load_checkpoint(tmp_path / "w.pkl")
    assert isinstance(loaded["blobs"]["conv.w"], torch.Tensor) and loaded["blobs"]["conv.w"].shape == (2, 2)


def _write_map(folder: Path, data: dict) -> Path:
    path = folder / f"{data.get('name', 'test-map')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_map_validation_names_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'strip_prefix'.*unknown field"):
        load_map(_write_map(tmp_path, {"name": "bad", "strip_prefix": ["module."]}))
    with pytest.raises(ConfigError, match=r"renames\[0\].*invalid regular expression"):
        load_map(_write_map(tmp_path, {"name": "bad2", "renames": [["(", "x"]]}))
    with pytest.raises(ConfigError, match="num_batches_tracked"):
        load_map(_write_map(tmp_path, {"name": "bad3", "num_batches_tracked": "zero"}))
    with pytest.raises(ConfigError, match=r"hooks\.state_dict"):
        load_map(_write_map(tmp_path, {"name": "bad4", "hooks": {"state_dict": "no colon"}}))
    with pytest.raises(ConfigError, match="unknown conversion map 'torchvision-resnt'.*torchvision-resnet"):
        load_map("torchvision-resnt")
    assert "torchvision-resnet" in convert.list_maps()


def state_dict_hook(state_dict, checkpoint, target_state_dict):
    """A map hook used below: scales one tensor and records that it saw the target."""
    state_dict = dict(state_dict)
    state_dict["lin.weight"] = state_dict["lin.weight"] * 2
    assert target_state_dict is not None
    return state_dict


def kwargs_hook(checkpoint):
    return {"num_classes": checkpoint["args"].num_classes, "width_div": 16}


def test_renames_drops_transforms_hooks_and_num_batches_tracked(tmp_path):
    @register_transform("negate_for_test")
    def negate(t):
        return -t

    cmap = load_map(_write_map(tmp_path, {
        "name": "toy", "version": 3, "container": ["model", "state_dict"], "strip_prefixes": ["module.", "base."],
        "renames": [[r"^E_conv\.", "conv."], [r"^proj\.", "lin."]], "drops": [r"^aux\."],
        "transforms": [{"match": r"^conv\.weight$", "op": "unsqueeze_temporal"},
                       {"match": r"^c1d\.weight$", "op": "squeeze_last"},
                       {"match": r"^t\.weight$", "op": "transpose_last2"},
                       {"match": r"^neg$", "op": "negate_for_test"}],
        "hooks": {"state_dict": "test_convert:state_dict_hook"}, "num_batches_tracked": "fill"}), trust_map=True)
    checkpoint = {"model": {
        "module.base.E_conv.weight": torch.ones(4, 3, 3, 3), "module.proj.weight": torch.ones(2, 2),
        "module.aux.weight": torch.ones(1), "module.c1d.weight": torch.ones(5, 4, 1),
        "module.t.weight": torch.arange(6.0).view(2, 3), "module.neg": torch.ones(1),
        "module.bn.weight": torch.ones(4), "module.bn.running_mean": torch.zeros(4),
        "module.old.num_batches_tracked": torch.tensor(7)}, "epoch": 3}
    target = {"conv.weight": torch.zeros(4, 3, 1, 3, 3), "lin.weight": torch.zeros(2, 2), "c1d.weight": torch.zeros(5, 4),
              "t.weight": torch.zeros(3, 2), "neg": torch.zeros(1), "bn.weight": torch.zeros(4),
              "bn.running_mean": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(0),
              "other.num_batches_tracked": torch.tensor(0)}
    out = convert_state_dict(checkpoint, cmap, target)

    assert set(out) == set(target) - {"other.num_batches_tracked"}  # filled only where the layer is present
    assert out["conv.weight"].shape == (4, 3, 1, 3, 3) and out["c1d.weight"].shape == (5, 4)
    assert out["t.weight"].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    assert out["neg"].item() == -1 and out["lin.weight"].sum().item() == 8
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and out["bn.num_batches_tracked"].dim() == 0
    convert.TRANSFORMS.pop("negate_for_test")


def test_convert_checkpoint_builds_target_through_registry(tmp_path, monkeypatch):
    """Without ``model=``, the named target comes from create_model with hook kwargs updated by model_kwargs."""
    source = _tiny_resnet(num_classes=7)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": _no_nbt(source.state_dict()), "args": argparse.Namespace(num_classes=7)}, path)
    calls = []

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return ResNet(layers=(1, 1, 1, 1), **kwargs)

    import zoo.factory

    monkeypatch.setattr(zoo.factory, "create_model", fake_create_model)
    cmap = ConversionMap.from_dict({"name": "toy", "target_model": "toy_model", "container": ["state_dict"],
                                    "hooks": {"model_kwargs": "test_convert:kwargs_hook"}}, trust_map=True)
    out = convert_checkpoint(path, cmap, tmp_path / "out", model_name="toy_model",
                             model_kwargs={"zero_init_residual": True})
    assert calls == [("toy_model", {"num_classes": 7, "width_div": 16, "zero_init_residual": True})]
    config = json.loads((out / "config.json").read_text())
    assert config["kwargs"] == {"num_classes": 7, "width_div": 16, "zero_init_residual": True}

    # Converting again replaces the earlier conversion; a folder with other content is refused.
    convert_checkpoint(path, cmap, out, model_name="toy_model")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_checkpoint(path, cmap, tmp_path / "busy")


def test_convert_checkpoint_strict_failure_writes_nothing(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(_no_nbt(_tiny_resnet(num_classes=3).state_dict()), path)
    with pytest.raises(ConversionError, match="mis-shaped"):
        convert_checkpoint(path, "torchvision-resnet", tmp_path / "out", model=_tiny_resnet(num_classes=5))
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def _small_registered_model():
    """A registered model with a config (for the round trip through create_model), or skip."""
    import zoo

    from zoo.errors import ZooError

    preferred = ("rga_s_resnet50", "rga_c_resnet50", "detr_r50_irpe")  # small and quick to build
    names = sorted(zoo.list_models(), key=lambda n: (n not in preferred, preferred.index(n) if n in preferred else 0, n))
    for name in names[:3]:
        try:
            zoo.model_info(name)
            return name, zoo.create_model(name)
        except (ZooError, TypeError, ValueError):
            continue
    pytest.skip("no registered model with a config yet")


def test_converted_folder_loads_with_create_model(tmp_path):
    import zoo

    name, model = _small_registered_model()
    path = tmp_path / "original.pth"
    torch.save(_no_nbt(model.state_dict()), path, _use_new_zipfile_serialization=False)
    out = convert_checkpoint(path, "torchvision-resnet", tmp_path / "converted", model_name=name)
    loaded = zoo.create_model(name, weights=out)
    assert not loaded.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_model_card_lists_the_matching_weights_metrics(tmp_path, monkeypatch):
    from zoo.config import ModelConfig, ReportedMetric, WeightsEntry

    path = tmp_path / "rpe-2.0-product-ctx-1-k_300epochs.pth"
    torch.save(_no_nbt(_tiny_resnet(num_classes=3).state_dict()), path)
    info = ModelConfig(name="detr_like", family="irpe", task="detection", weights={
        "coco_150ep": WeightsEntry(tag="coco_150ep", source="https://example.org/rpe-2.0-product-ctx-1-k.pth"),
        "coco_300ep": WeightsEntry(tag="coco_300ep", source="https://example.org/rpe-2.0-product-ctx-1-k_300epochs.pth")},
        reported=(ReportedMetric("AP", 41.0, "coco_val2017", "README", weights="coco_150ep"),
                  ReportedMetric("AP", 42.2, "coco_val2017", "README", weights="coco_300ep"),
                  ReportedMetric("AP50", 62.3, "coco_val2017", "README", weights="coco_300ep")))
    import zoo.hub

    monkeypatch.setattr(zoo.hub, "model_info", lambda name: info)
    out = convert_checkpoint(path, "torchvision-resnet", tmp_path / "out", model=_tiny_resnet(num_classes=3),
                             model_name="detr_like")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "detection" in front["tags"]
    (result,) = front["model-index"][0]["results"]  # one dataset, the 300-epoch file's two metrics
    assert result["dataset"]["name"] == "coco_val2017"
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [("AP", 42.2), ("AP50", 62.3)]
    assert "for the `coco_300ep` weights" in card
