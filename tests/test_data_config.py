"""Preprocessing and labels from the weights: ``zoo.data.resolve_data_config`` / ``create_transform``
(timm's key names) and the class names ``predict`` draws and prints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.cli import main
from zoo.config import PretrainedCfg
from zoo.data import create_transform, resolve_data_config
from zoo.data.labels import LABEL_SETS
from zoo.data.transforms import VideoEvalTransform
from zoo.errors import ConfigError
from zoo.predict import predict
from zoo.registry import model_info


def _image(size=(90, 60), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sasa_mini():
    return zoo.create_model("sasa_resnet_mini", pretrained=True)


def test_resolve_data_config_reads_the_weights_preprocessing(sasa_mini):
    # timm's resolve_data_config(model=m) answered 224 bicubic; the config says 64 bilinear
    config = resolve_data_config(model=sasa_mini)
    assert config == {"task": "image classification", "input_size": (3, 64, 64), "interpolation": "bilinear",
                      "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_mode": "center",
                      "crop_pct": 0.875}
    assert resolve_data_config(pretrained_cfg=sasa_mini.pretrained_cfg) == config
    # overrides, with timm's names (input_size also as (H, W) or an int)
    assert resolve_data_config(model=sasa_mini, input_size=96, interpolation="bicubic")["input_size"] == (3, 96, 96)
    assert resolve_data_config(model=sasa_mini, input_size=(3, 80, 72))["input_size"] == (3, 80, 72)
    # nothing known: timm's defaults for the sizes, the originals' bilinear
    assert resolve_data_config()["input_size"] == (3, 224, 224)
    with pytest.raises(ConfigError, match="unknown key.*img_size"):
        resolve_data_config(model=sasa_mini, img_size=64)


@pytest.mark.parametrize("name,expected", [
    ("rga_sc_mini", {"input_size": (3, 64, 32), "crop_mode": "squash", "crop_pct": 1.0}),
    ("rsanet_mini", {"input_size": (3, 48, 48), "resize": (54, 72), "num_frames": 8}),
    ("detr_irpe_mini", {"resize_shorter": 128, "max_size": 192}),
    ("handraise_rpa_mini", {"resize_shorter": 160, "max_size": 288, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}),
    ("deit_tiny_patch16_224_ctx_product_50_shared_k", {"input_size": (3, 224, 224), "interpolation": "bicubic"}),
])
def test_resolve_data_config_of_every_task(name, expected):
    config = resolve_data_config(pretrained_cfg=PretrainedCfg.build(model_info(name)))
    assert config["task"] == model_info(name).task
    assert {key: config[key] for key in expected} == expected


def test_create_transform_of_every_task():
    image = _image((90, 60))
    cls = create_transform(resolve_data_config(pretrained_cfg=PretrainedCfg.build(model_info("sasa_resnet_mini"))))
    x = cls(image)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    # the centre crop of the shorter side resized to 64 / 0.875 = 73 (bilinear), normalised
    resized = np.asarray(image.resize((109, 73), Image.BILINEAR), dtype=np.float32) / 255
    assert abs(float(x.mean()) - float(((resized[4:68, 22:86] - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).mean())) < 0.05

    reid = create_transform(resolve_data_config(pretrained_cfg=PretrainedCfg.build(model_info("rga_sc_mini"))))
    assert reid(image).shape == (3, 64, 32)  # squashed to exactly the input size
    det = create_transform(resolve_data_config(pretrained_cfg=PretrainedCfg.build(model_info("detr_irpe_mini"))))
    assert det(image).shape == (3, 128, 192)  # shorter side 128, longer capped at 192
    clip = create_transform(resolve_data_config(pretrained_cfg=PretrainedCfg.build(model_info("rsanet_mini"))))
    assert isinstance(clip, VideoEvalTransform)
    assert clip([_image((96, 72), seed) for seed in range(8)]).shape == (24, 48, 48)  # a clip transform

    train = create_transform(resolve_data_config(pretrained_cfg=PretrainedCfg.build(model_info("sasa_resnet_mini"))),
                             is_training=True)
    gen = torch.Generator().manual_seed(0)
    first = train(image, gen)
    assert first.shape == (3, 64, 64) and torch.equal(first, train(image, torch.Generator().manual_seed(0)))
    assert train(image).shape == (3, 64, 64)  # torch's default generator when none is given


def test_create_transform_refuses_what_it_cannot_make():
    with pytest.raises(ConfigError, match="in_chans 1"):
        create_transform(resolve_data_config(input_size=(1, 64, 64)))
    with pytest.raises(ConfigError, match="crop_mode"):
        create_transform(resolve_data_config(crop_mode="squash"))
    with pytest.raises(ConfigError, match="unknown task"):
        resolve_data_config(task="segmentation")


def test_a_model_built_for_other_channels_reports_them():
    model = zoo.create_model("sasa_resnet_mini", pretrained=True, in_chans=1)
    assert resolve_data_config(model=model)["input_size"] == (1, 64, 64)


def test_predict_and_eval_use_the_data_config(tmp_path, sasa_mini):
    """predict's classifier input is create_transform(resolve_data_config(model)): the same logits."""
    path = tmp_path / "img.png"
    _image((80, 70)).save(path)
    top = predict(sasa_mini, path, tmp_path / "out.png")
    x = create_transform(resolve_data_config(model=sasa_mini))(Image.open(path).convert("RGB"))
    with torch.no_grad():
        probs = sasa_mini(x[None]).softmax(-1)[0]
    assert top[0]["class_id"] == int(probs.argmax()) and abs(top[0]["score"] - float(probs.max())) < 1e-6


# ---------------------------------------------------------------------------------------------
# Labels in predict


def _shapes_image(tmp_path, kind: str):
    from zoo.data.synthetic import make_dataset

    root = make_dataset(kind, tmp_path / kind, split="val", seed=0, size="tiny")
    if kind == "shapes-cls":
        return next(root.glob("val/*/*.JPEG"))
    return sorted((root / "val2017").glob("*.jpg"))[0]


@pytest.mark.parametrize("name,kind,names", [("detr_irpe_mini", "shapes-det", {"circle", "square", "triangle"}),
                                             ("handraise_rpa_mini", "raised-hands", {"hand-raising"})])
def test_predict_labels_detections_with_the_weights_names(tmp_path, name, kind, names):
    image = _shapes_image(tmp_path, kind)
    detections = predict(name, image, tmp_path / "boxes.png", threshold=0.05)
    assert detections, "the mini finds something on its own validation image"
    assert {d["label"] for d in detections} <= names
    assert all(d["label"] == LABEL_SETS[kind][d["category_id"]] for d in detections)
    assert not {"person", "bicycle", "car"} & {d["label"] for d in detections}  # no COCO names on shapes


def test_cli_predict_prints_class_names(tmp_path, capsys):
    image = _shapes_image(tmp_path, "shapes-cls")
    assert main(["predict", "sasa_resnet_mini", "--image", str(image), "--out", str(tmp_path / "cls.png")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 5 and all(row["label"] == LABEL_SETS["shapes-cls"][row["class_id"]] for row in rows)
    assert main(["predict", "detr_irpe_mini", "--image", str(_shapes_image(tmp_path, "shapes-det")),
                 "--out", str(tmp_path / "det.png"), "--threshold", "0.05"]) == 0
    labels = {json.loads(line)["label"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")}
    assert labels and labels <= {"circle", "square", "triangle"}


def test_predict_refuses_models_without_classes_of_one_image(tmp_path):
    path = tmp_path / "img.png"
    _image().save(path)
    with pytest.raises(ConfigError, match="re-identification"):
        predict("rga_sc_mini", path, tmp_path / "o.png")
    assert main(["predict", "rsanet_mini", "--image", str(path), "--out", str(tmp_path / "o.png")]) == 2
