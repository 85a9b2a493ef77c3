"""``imagenet`` protocol end to end on a tiny class-folder dataset the test writes itself."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

import zoo
from zoo.data.imagefolder import ImageFolder, eval_transform
from zoo.errors import DatasetError
from zoo.eval.protocol import get_protocol
from zoo.eval.runner import evaluate
from zoo.registry import model_info

COLOURS = {"c0_red": (255, 0, 0), "c1_green": (0, 255, 0), "c2_blue": (0, 0, 255)}


def _write_dataset(root, split="val", mislabel=True):
    """3 classes x 2 images (36x40 PNG/JPEG, one saturated colour each); with ``mislabel`` the second blue
    image is green, so a colour classifier gets 5 of 6 right."""
    for name, colour in COLOURS.items():
        folder = root / split / name if split else root / name
        folder.mkdir(parents=True)
        for i in range(2):
            fill = (0, 255, 0) if (mislabel and name == "c2_blue" and i == 1) else colour
            suffix = ".png" if i == 0 else ".JPEG"
            Image.new("RGB", (40, 36), fill).save(folder / f"img_{i}{suffix}")
    (root / (split or ".") / "c0_red" / "Thumbs.db").write_bytes(b"not an image")
    return root


class ColourClassifier(nn.Module):
    """logits = mean of each normalised channel (R, G, B) + 7 constant extra classes: the colour wins."""

    def forward(self, x):
        scores = x.mean(dim=(2, 3))
        return torch.cat([scores, scores.new_full((x.shape[0], 7), -100.0)], 1)


def test_imagefolder_reads_classes_in_sorted_order(tmp_path):
    _write_dataset(tmp_path, split=None)
    data = ImageFolder(tmp_path, transform=eval_transform(32, crop_pct=1.0))
    assert data.classes == sorted(COLOURS) and len(data) == 6  # Thumbs.db ignored
    image, label = data[5]
    assert image.shape == (3, 32, 32) and label == 2
    assert len(ImageFolder(tmp_path, limit=4)) == 4


def test_eval_transform_resizes_and_centre_crops():
    transform = eval_transform((224, 224), crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1))
    image = Image.new("RGB", (512, 256), (255, 0, 0))
    out = transform(image)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out[0], torch.ones(224, 224))


def test_imagenet_protocol_end_to_end(tmp_path):
    _write_dataset(tmp_path)
    result = evaluate("sasa_resnet26_cifar", tmp_path, model=ColourClassifier(), batch_size=4, progress=False,
                      options={"num_classes": 3, "split": "val"}, out=tmp_path / "results.json")
    assert result.metrics == pytest.approx({"top1": 500 / 6, "top5": 100.0})
    assert result.num_samples == 6 and result.dataset == "cifar10_test"
    top1 = next(r for r in result.rows if r.metric == "top1")
    assert top1.reported == 90.94 and top1.difference == pytest.approx(500 / 6 - 90.94)
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    limited = evaluate("sasa_resnet26_cifar", tmp_path, model=ColourClassifier(), batch_size=4, progress=False,
                       options={"num_classes": 3, "split": "val"}, limit=2)
    assert limited.limited and limited.num_samples == 2 and limited.metrics["top1"] == 100.0


def test_sasa_model_through_the_protocol(tmp_path):
    _write_dataset(tmp_path, split=None, mislabel=False)
    model = zoo.create_model("sasa_resnet26_cifar", num_classes=3).eval()
    result = evaluate("sasa_resnet26_cifar", tmp_path, model=model, batch_size=3, progress=False,
                      options={"num_classes": 3})
    assert result.num_samples == 6
    assert 0.0 <= result.metrics["top1"] <= 100.0 and result.metrics["top5"] == 100.0  # 3 classes


def test_ties_are_ranked_like_topk_accuracy(tmp_path):
    _write_dataset(tmp_path, split=None, mislabel=False)
    protocol = get_protocol("imagenet")(tmp_path, model_info("sasa_resnet26_cifar"), {"num_classes": 3})

    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 10)  # all tied: stable order ranks class 0 first

    batch = protocol.collate([protocol.dataset()[i] for i in range(6)])
    metrics = protocol.compute(protocol.predict(Constant(), batch, "cpu"))
    assert metrics == pytest.approx({"top1": 100 / 3, "top5": 100.0})


def test_missing_or_malformed_dataset_is_named(tmp_path):
    protocol_cls = get_protocol("imagenet")
    cfg = model_info("sasa_resnet50")
    with pytest.raises(DatasetError, match="does not exist"):
        protocol_cls(tmp_path / "nowhere", cfg, {})
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="expected class sub-folders"):
        protocol_cls(tmp_path, cfg, {}).dataset()
    (tmp_path / "val" / "n01440764").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        protocol_cls(tmp_path, cfg, {}).dataset()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n01440764" / "a.JPEG")
    with pytest.raises(DatasetError, match="expected 1000 class folders"):
        protocol_cls(tmp_path, cfg, {"num_classes": 1000}).dataset()
    (tmp_path / "val" / "n01440764" / "broken.JPEG").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read image"):
        protocol_cls(tmp_path, cfg, {}).dataset()[1]
    with pytest.raises(ValueError, match="unknown option"):
        protocol_cls(tmp_path, cfg, {"crops": 10})


def test_cli_convert_then_eval_a_leader_checkpoint(tmp_path, capsys):
    """`zoo convert --from sasa-leader` then `zoo eval --weights DIR` on class folders, as the notes say."""
    from test_sasa_models import _fake_leader_checkpoint

    from zoo.cli import main

    src = tmp_path / "model_CIFAR10_ResNet26_False_ckpt.tar"
    _fake_leader_checkpoint(src, "ResNet26_classes10_stemFalse", arch="ResNet26")
    assert main(["convert", "--from", "sasa-leader", str(src), "--out", str(tmp_path / "r26")]) == 0
    data = _write_dataset(tmp_path / "cifar", split="test", mislabel=False)
    assert main(["eval", "sasa_resnet26_cifar", "--weights", str(tmp_path / "r26"), "--data", str(data),
                 "--options", '{"num_classes": 3}', "--no-progress", "--out", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert "| top1 | 90.94 |" in printed and "6 samples" in printed
