"""zoo.train: every family's task reads its tiny synthetic train split, its loss is finite and
goes down when one batch is repeated, training is reproducible, the output folder loads.

Small models only (a few thousand parameters) and one torch thread: on a shared 2-core machine
extra threads only add contention.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from zoo.config import ModelConfig
from zoo.data.synthetic import make_dataset
from zoo.errors import DatasetError
from zoo.registry import model_info
from zoo.train import ReidTask, VideoTask, build_task, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLS = ("sasa_resnet26_convstem", dict(num_classes=10, width_div=16, heads=1, kernel_size=3), {"input_size": [32, 32]})
REID = ("rga_sc_resnet50", dict(num_classes=6, height=64, width=32, width_div=16, cha_ratio=2, spa_ratio=2,
                                down_ratio=2), None)
DETR = ("detr_r50_irpe", dict(num_classes=4, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                              num_queries=8, backbone_width_div=16, dropout=0.0), {"resize_shorter": 64, "max_size": 96})
VIDEO = ("rsanet_r50", dict(num_classes=8, num_segments=4, width_div=16, layers=[1, 1, 1, 1],
                           rsa_positions=[[0], [0], [], []], nh=1, kernel_size=[3, 3, 3], stochastic_depth=0.0,
                           dropout=0.0), {"input_size": [32, 32], "resize": [36, 48]})
CASES = {"classification": (CLS, "shapes-cls"), "reid": (REID, "shapes-reid"), "detr": (DETR, "shapes-det"),
         "video": (VIDEO, "moving-shapes")}


def _skip_unregistered(name: str) -> None:
    if name not in zoo.list_models():
        pytest.skip(f"{name} is not registered (yet)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_dataset(kind, root / kind, split="train", seed=0, size="tiny")
        return made[kind]

    return get


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("family", list(CASES))
def test_overfits_one_batch(family, data):
    (name, kwargs, pre), kind = CASES[family]
    _skip_unregistered(name)
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).train()
    task = build_task(model, model_info(name), data(kind), batch_size=8 if family == "reid" else 4,
                      preprocessing=pre, model_kwargs=kwargs)
    batch = next(iter(task.batches(0)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(12):
        loss = task.loss(model, batch, "cpu")
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < losses[0], losses


@pytest.mark.parametrize("family", list(CASES))
def test_train_is_reproducible_and_loads(family, data, tmp_path):
    (name, kwargs, pre), kind = CASES[family]
    _skip_unregistered(name)
    lines = []
    common = dict(epochs=2, batch_size=8 if family == "reid" else 4, lr=1e-3, seed=3, limit=24 if family == "reid" else 8,
                  preprocessing=pre, log=lines.append, **kwargs)
    first = train(name, data(kind), tmp_path / "a", **common)
    second = train(name, data(kind), tmp_path / "b", **common)
    assert first == tmp_path / "a"
    assert sum(line.startswith("epoch ") for line in lines) == 4  # one line per epoch per run

    a, b = _state(first), _state(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"

    config = json.loads((first / "config.json").read_text())
    assert config["model"] == name and config["source"] == "trained by zoo train"
    assert config["kwargs"]["num_classes"] == kwargs["num_classes"]
    record = config["train"]
    assert record["seed"] == 3 and record["epochs"] == 2 and np.isfinite(record["final_loss"])
    assert record["dataset"]["synthetic"]["kind"] == kind
    assert (first / "README.md").read_text().startswith("---")

    # the folder's config.json carries the kwargs: no need to repeat them
    model = zoo.create_model(name, weights=first)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)
    assert zoo.create_model(name, weights=first, **kwargs).state_dict().keys() == loaded.keys()


def test_different_seed_gives_different_weights(data, tmp_path):
    name, kwargs, pre = CLS
    common = dict(epochs=1, batch_size=4, lr=1e-3, limit=4, preprocessing=pre, log=None, **kwargs)
    a = _state(train(name, data("shapes-cls"), tmp_path / "a", seed=0, **common))
    b = _state(train(name, data("shapes-cls"), tmp_path / "b", seed=1, **common))
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_batches_are_seeded(data):
    name, kwargs, pre = CLS
    model = zoo.create_model(name, **kwargs)
    task = build_task(model, model_info(name), data("shapes-cls"), batch_size=4, seed=5, preprocessing=pre)
    assert len(task) == 30 and len(task.epoch_indices(0)) == 7  # 30 images, incomplete last batch dropped
    first, again = next(iter(task.batches(0))), next(iter(task.batches(0)))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0].shape == (4, 3, 32, 32)
    assert task.epoch_indices(0) != task.epoch_indices(1)


def test_reid_pk_batches(data):
    name, kwargs, _ = REID
    model = zoo.create_model(name, **kwargs)
    task = build_task(model, model_info(name), data("shapes-reid"), batch_size=8, model_kwargs=kwargs)
    assert isinstance(task, ReidTask) and task.num_identities == 6
    assert (task.height, task.width) == (64, 32)  # the size the RGA modules were built for
    batches = task.epoch_indices(0)
    assert len(batches) == 3  # 6 identities / P = 2
    seen = set()
    for indices in batches:
        labels = [task.label_of[task.images[i].pid] for i in indices]
        assert len(labels) == 8 and len(set(labels)) == 2 and all(labels.count(x) == 4 for x in set(labels))
        seen |= set(labels)
    assert seen == set(range(6))  # every identity once an epoch
    images, labels = next(iter(task.batches(0)))
    assert images.shape == (8, 3, 64, 32) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="multiple of num_instances"):
        build_task(model, model_info(name), data("shapes-reid"), batch_size=6, model_kwargs=kwargs)
    with pytest.raises(ValueError, match="P >= 2"):
        build_task(model, model_info(name), data("shapes-reid"), batch_size=4, model_kwargs=kwargs)


class _TinyVideoNet(nn.Module):
    """(B, 3T, H, W) -> (B, num_classes): enough to exercise the video task."""

    def __init__(self, frames: int, num_classes: int = 8):
        super().__init__()
        self.fc = nn.Linear(3 * frames, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_video_task_reads_something_something_layout(data):
    cfg = ModelConfig(name="video_toy", family="rsa", task="video classification",
                      preprocessing={"input_size": [32, 32], "resize": [36, 48]}, eval={"protocol": "ssv"})
    model = _TinyVideoNet(frames=4)
    task = build_task(model, cfg, data("moving-shapes"), batch_size=4, seed=0, model_kwargs={"num_segments": 4})
    assert isinstance(task, VideoTask) and len(task) == 8  # tiny: one clip per class
    gen = torch.Generator().manual_seed(0)
    indices = task.frame_indices(18, gen)  # avg 4: one frame from each of [1-4], [5-8], [9-12], [13-16]
    assert all(4 * i + 1 <= f <= 4 * i + 4 for i, f in enumerate(indices))
    assert task.frame_indices(3, gen) == [1, 1, 1, 1]  # fewer frames than segments
    clips, labels = next(iter(task.batches(0)))
    assert clips.shape == (4, 12, 32, 32) and labels.max() < 8
    assert torch.isfinite(task.loss(model, (clips, labels), "cpu"))


def test_errors_name_the_problem(data, tmp_path):
    name, kwargs, pre = CLS
    wrong = {**kwargs, "num_classes": 7}
    model = zoo.create_model(name, **wrong)
    task = build_task(model, model_info(name), data("shapes-cls"), batch_size=4, preprocessing=pre)
    with pytest.raises(DatasetError, match="10 class folders but the model has 7 outputs"):
        task.loss(model.train(), next(iter(task.batches(0))), "cpu")
    with pytest.raises(ValueError, match="without a weights tag"):
        train(f"{name}.some_tag", data("shapes-cls"), tmp_path / "x", epochs=1, batch_size=4, lr=1e-3)
    with pytest.raises(ValueError, match="eval protocol"):
        train("rpa_cifar_toy", data("shapes-cls"), tmp_path / "x", epochs=1, batch_size=4, lr=1e-3, log=None)
    name_r, kwargs_r, _ = REID
    with pytest.raises(DatasetError, match="bounding_box_train"):
        build_task(zoo.create_model(name_r, **kwargs_r), model_info(name_r), data("shapes-cls"), batch_size=8,
                   model_kwargs=kwargs_r)


def test_cli_train(data, tmp_path, capsys):
    from zoo.cli import main

    name, kwargs, pre = CLS
    out = tmp_path / "cli"
    assert main(["train", name, "--data", str(data("shapes-cls")), "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--lr", "1e-3", "--limit", "4", "--kwargs", json.dumps(kwargs),
                 "--preprocessing", json.dumps(pre)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1  loss" in printed and f"wrote {out}" in printed
    assert zoo.create_model(name, weights=out) is not None


def test_deterministic_mode_restores_what_it_changes(monkeypatch):
    """The generators go on as if no training had run; the flags and the environment are as before."""
    import os
    import random

    from zoo.train.loop import _Deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())

    def seed_all(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_all(1)
    expected = draws()
    seed_all(1)
    with _Deterministic(seed=3):
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"]
        seeded = draws()
    assert draws() == expected
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == flags
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with _Deterministic(seed=3):
        assert draws() == seeded  # the same seed, the same draws

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a caller's own setting is kept
    with _Deterministic(seed=3):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_same_size_batches_group_that_share_of_detection_batches(data, tmp_path):
    """--same-size-batches: that share of the samples is cut into batches sorted by (resized) size, which a
    detector sees unpadded; the rest stay random; every epoch still uses each sample at most once."""
    name, kwargs, pre = DETR
    model = zoo.create_model(name, **kwargs)
    common = dict(batch_size=2, seed=0, preprocessing=pre, model_kwargs=kwargs)
    plain = build_task(model, model_info(name), data("shapes-det"), **common)
    grouped = build_task(model, model_info(name), data("shapes-det"), same_size_batches=1.0, **common)
    assert plain.epoch_indices(0) == build_task(model, model_info(name), data("shapes-det"), same_size_batches=0,
                                                **common).epoch_indices(0)
    batches = grouped.epoch_indices(0)
    assert sorted(i for b in batches for i in b) == list(range(len(grouped)))  # 12 images, batches of 2

    def padding(batch):
        sizes = [grouped.sample_size(i) for i in batch]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        return sum(height * width - h * w for h, w in sizes)

    assert sum(map(padding, batches)) < sum(map(padding, plain.epoch_indices(0)))
    images = next(iter(grouped.batches(0)))[0]
    assert [tuple(im.shape[1:]) for im in images] == [grouped.sample_size(i) for i in batches[0]]
    # recorded, and refused where batches are not padded
    out = train(name, data("shapes-det"), tmp_path / "grouped", epochs=1, batch_size=2, lr=1e-4, limit=4, log=None,
                preprocessing=pre, same_size_batches=0.5, **kwargs)
    assert json.loads((out / "config.json").read_text())["train"]["same_size_batches"] == 0.5
    cls_name, cls_kwargs, cls_pre = CLS
    with pytest.raises(ValueError, match="same_size_batches"):
        build_task(zoo.create_model(cls_name, **cls_kwargs), model_info(cls_name), data("shapes-cls"), batch_size=4,
                   preprocessing=cls_pre, same_size_batches=0.5)


def test_weights_start_from_a_trained_folder_and_are_recorded_with_their_sha256(data, tmp_path):
    name, kwargs, pre = CLS
    common = dict(epochs=1, batch_size=4, lr=1e-3, limit=4, preprocessing=pre, log=None, plots=False, **kwargs)
    first = train(name, data("shapes-cls"), tmp_path / "first", seed=0, **common)
    tuned = train(name, data("shapes-cls"), tmp_path / "tuned", seed=0, weights=str(first), **common)
    record = json.loads((tuned / "config.json").read_text())["train"]
    assert (record["initial_weights"], record["initial_weights_sha256"]) == \
        (str(first), hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest())
    from zoo.cli import build_parser  # --init (the name the detr_irpe_mini recipe first used) is --weights

    parsed = build_parser().parse_args(["train", name, "--data", "D", "--out", "O", "--init", str(first)])
    assert parsed.weights == str(first)
    again = train(name, data("shapes-cls"), tmp_path / "again", seed=0, **common)  # from scratch: not the tuned weights
    a, b = _state(tuned), _state(again)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_pretrained_weights_on_new_classes(tmp_path):
    """`zoo train NAME --weights TAG --kwargs '{"num_classes": 5}'` on 5 classes: every parameter but the
    classifier starts from the weights, the classifier starts new, and the result loads back with 5 classes."""
    import shutil

    import zoo
    from zoo.data.synthetic import make_dataset
    from zoo.train import train

    shapes = make_dataset("shapes-cls", tmp_path / "shapes", split="all", seed=0, size="tiny")
    for split in ("train", "val"):  # five of the ten shapes: a new task
        for folder in sorted((shapes / split).iterdir())[:5]:
            shutil.copytree(folder, tmp_path / "five" / split / folder.name)
    pretrained = zoo.create_model("sasa_resnet_mini", pretrained=True)
    out = train("sasa_resnet_mini", tmp_path / "five", tmp_path / "tuned", epochs=1, batch_size=5, lr=1e-9, seed=0,
                weights="synthetic", log=None, num_classes=5)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["initial_weights"] == "synthetic" and config["kwargs"]["num_classes"] == 5
    assert config["kwargs"]["zero_init_residual"] is True  # recorded by the weights folder, kept
    tuned = zoo.create_model("sasa_resnet_mini", weights=out)
    assert tuned.fc.weight.shape == (5, 256)
    start = dict(pretrained.named_parameters())
    for key, value in tuned.named_parameters():
        if not key.startswith("fc."):
            torch.testing.assert_close(value, start[key], atol=1e-6, rtol=0, msg=key)  # a tiny lr: they barely moved
