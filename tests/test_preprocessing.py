"""Typed preprocessing: validated where the config states it, a mapping of the stated fields, and the
one home of the transforms and of the ImageNet mean and std (zoo.data.transforms)."""
from __future__ import annotations

import dataclasses
import json
import re
import textwrap

import pytest
import torch
from PIL import Image

import zoo
from conftest import REPO_ROOT
from zoo.config import ModelConfig, Preprocessing, load_family_config
from zoo.data import transforms
from zoo.errors import ConfigError
from zoo.registry import format_info

FAMILY = """
    family: toyfam
    title: Toy family
    models:
      toy:
        task: classification
        preprocessing: {PRE}
"""


def _family(tmp_path, pre: str):
    path = tmp_path / "toyfam.yaml"
    path.write_text(textwrap.dedent(FAMILY).replace("{PRE}", pre))
    return load_family_config(path)


def test_every_config_is_typed_and_prints_as_written():
    for name in zoo.list_models():
        pre = zoo.model_info(name).preprocessing
        assert isinstance(pre, Preprocessing)
        assert Preprocessing.parse(json.loads(json.dumps(dict(pre))), name) == pre  # JSON round trip
    detr = zoo.model_info("detr_irpe_mini").preprocessing
    assert (detr.resize_shorter, detr.max_size, detr.input_size) == (128, 192, None)
    assert list(detr) == ["resize_shorter", "max_size", "mean", "std", "interpolation"]  # the stated fields
    assert "preprocessing: {\"resize_shorter\": 128, \"max_size\": 192" in format_info("detr_irpe_mini")


def test_stated_fields_are_parsed(tmp_path):
    pre = _family(tmp_path, "{input_size: 32, mean: [0, 0, 0], std: [1, 1, 1], num_frames: 8}").models["toy"].preprocessing
    assert pre.input_size == (32, 32) and pre.mean == (0.0, 0.0, 0.0) and pre.num_frames == 8
    assert pre.crop_pct is None and "crop_pct" not in pre
    assert repr(pre) == "Preprocessing(input_size=(32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_frames=8)"


@pytest.mark.parametrize("pre, message", [
    ("{input_sise: [32, 32]}", "preprocessing: unknown field(s) ['input_sise']"),
    ("{input_size: [32, 0]}", "preprocessing.input_size: expected a positive int or [height, width]"),
    ("{input_size: '32'}", "preprocessing.input_size"),
    ("{mean: [0.5, 0.5]}", "preprocessing.mean: expected three numbers"),
    ("{std: [0.2, 0, 0.2]}", "preprocessing.std: expected positive numbers"),
    ("{crop_pct: 1.5}", "preprocessing.crop_pct: expected a number in (0, 1]"),
    ("{interpolation: area}", "preprocessing.interpolation: expected one of bilinear, bicubic, nearest"),
    ("{num_frames: true}", "preprocessing.num_frames: expected a positive int"),
    ("{input_size: [224, 224], resize: [200, 300]}", "preprocessing.resize: [200, 300] must be at least input_size"),
    ("[224, 224]", "preprocessing: expected dict"),
])
def test_malformed_preprocessing_names_file_and_field(tmp_path, pre, message):
    with pytest.raises(ConfigError) as info:
        _family(tmp_path, pre)
    assert str(tmp_path / "toyfam.yaml") in str(info.value) and "models.toy" in str(info.value)
    assert message in str(info.value)


def test_a_mapping_given_in_code_is_validated_too():
    cfg = ModelConfig(name="toy", family="f", task="t", preprocessing={"input_size": [64, 32]})
    assert cfg.preprocessing.input_size == (64, 32)
    assert dataclasses.replace(cfg, preprocessing={**cfg.preprocessing, "max_size": 96}).preprocessing.max_size == 96
    with pytest.raises(ConfigError, match="model 'toy': preprocessing.max_size"):
        dataclasses.replace(cfg, preprocessing={"max_size": -1})


def test_unstated_fields_take_the_originals_defaults():
    image = Image.new("RGB", (300, 200), (255, 0, 0))
    unstated = Preprocessing()
    assert transforms.classification_eval_transform(unstated)(image).shape == (3, 224, 224)
    assert transforms.reid_eval_transform(unstated)(image).shape == (3, 256, 128)
    assert transforms.detection_eval_transform(unstated)(image).shape == (3, 800, 1200)
    red = transforms.reid_eval_transform(unstated)(image)[:, 0, 0]
    torch.testing.assert_close(red, (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(transforms.IMAGENET_MEAN))
                               / torch.tensor(transforms.IMAGENET_STD))
    video = transforms.VideoEvalTransform(unstated)
    assert (video.resize, video.crop) == ((240, 320), 224)
    with pytest.raises(ConfigError, match="PIL bilinear"):
        transforms.reid_eval_transform(Preprocessing(interpolation="bicubic"))


def test_the_imagenet_constants_live_in_transforms_only():
    literal = re.compile(r"0\.485\b|0\.229\b")
    found = [str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "zoo").rglob("*.py"))
             if literal.search(p.read_text(encoding="utf-8"))]
    assert found == ["zoo/data/transforms.py"]
