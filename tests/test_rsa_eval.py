"""The ``ssv`` protocol end to end on a tiny Something-Something dataset in the original layout."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from PIL import Image

import zoo
from zoo.data.ssv import SSVideoClips, read_split, segment_indices
from zoo.errors import DatasetError
from zoo.eval.runner import evaluate
from zoo.models.rsanet import RSANet

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (video_dir, num_frames, label, code): frames are flat colours, R = 10 * frame number, G = 20 * code;
# the oracle model below predicts "class == code", so code == label is a top-1 hit, label + 2 a
# top-5-only hit, label + 10 a miss.
VIDEOS = [("100218", 20, 0, 0), ("sub/27", 3, 3, 3), ("5002", 16, 5, 7), ("777", 25, 7, 17), ("31", 17, 2, 2)]
NUM_CLASSES = 20


def _write_dataset(root, list_name="something_val_cluster.txt", size=(50, 40)):
    lines = []
    for video, num_frames, label, code in VIDEOS:
        folder = root / video
        folder.mkdir(parents=True)
        for index in range(1, num_frames + 1):
            Image.new("RGB", size, (10 * index, 20 * code, 0)).save(folder / f"img_{index:05d}.jpg", quality=100)
        lines.append(f"{video} {num_frames} {label}")
    (root / list_name).write_text("\n".join(lines) + "\n")
    return root


class Oracle(torch.nn.Module):
    """Reads G of the first frame back (undoing the normalisation): logits = -|class - code|."""

    def forward(self, x):  # (B, 3T, H, W)
        g = (x[:, 1].mean(dim=(1, 2)) * STD[1] + MEAN[1]) * 255
        code = torch.round(g / 20)
        return -(torch.arange(NUM_CLASSES, dtype=x.dtype)[None] - code[:, None]).abs()


def test_segment_sampling_is_the_originals():
    assert segment_indices(40, 16) == [int(1.25 + 2.5 * i) + 1 for i in range(16)]
    assert segment_indices(16, 16) == [1] * 16  # not more frames than segments: frame 1 repeated
    assert segment_indices(3, 8) == [1] * 8
    assert segment_indices(20, 4) == [3, 8, 13, 18]
    assert segment_indices(20, 4, clip=0, clips=2) == [2, 7, 12, 17]
    assert segment_indices(20, 4, clip=1, clips=2) == [4, 9, 14, 19]


def test_reader_layout_and_preprocessing(tmp_path):
    root = _write_dataset(tmp_path / "ssv1")
    records = read_split(root / "something_val_cluster.txt", root)
    assert [(r.path, r.num_frames, r.label) for r in records] == [(root / v, n, l) for v, n, l, _ in VIDEOS]
    data = SSVideoClips(records, num_segments=8)
    clip, label = data[0]
    assert clip.shape == (1, 24, 224, 224) and label == 0
    frames = clip[0].view(8, 3, 224, 224)
    red = (frames[:, 0].mean(dim=(1, 2)) * STD[0] + MEAN[0]) * 255
    assert torch.round(red / 10).int().tolist() == segment_indices(20, 8)  # channel 3 t + c, sampled frames
    # a 240x320 frame: resized to itself, centre crop at top 8, left 48
    big = tmp_path / "big"
    (big / "v").mkdir(parents=True)
    pixels = torch.randint(0, 256, (240, 320, 3), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(big / "v" / "img_00001.png")
    (big / "list.txt").write_text("v 1 4\n")
    one = SSVideoClips(read_split(big / "list.txt"), num_segments=2, prefix="img_", template="{:05d}.png")
    clip, _ = one[0]
    expected = (pixels[8:232, 48:272].permute(2, 0, 1).float() / 255 - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(clip[0, :3], expected)
    torch.testing.assert_close(clip[0, 3:], expected)  # frame 1 repeated


def test_protocol_top1_top5(tmp_path):
    root = _write_dataset(tmp_path / "ssv1")
    result = evaluate("rsanet_r50_ssv1_16f", root, model=Oracle(), options={"num_frames": 4}, progress=False,
                      batch_size=2, out=tmp_path / "res.json")
    assert result.metrics == pytest.approx({"top1": 60.0, "top5": 80.0})
    rows = {r.metric: r for r in result.rows}
    assert rows["top1"].reported == 54.0 and rows["top5"].reported == 81.1
    assert json.loads((tmp_path / "res.json").read_text())["num_samples"] == 5
    # multi-clip averaging: every clip gives the same logits here, so the same numbers
    two = evaluate("rsanet_r50_ssv1_16f", root, model=Oracle(), options={"num_frames": 4, "clips": 2},
                   progress=False, batch_size=3)
    assert two.metrics == pytest.approx({"top1": 60.0, "top5": 80.0})
    limited = evaluate("rsanet_r50_ssv1_16f", root, model=Oracle(), options={"num_frames": 4}, limit=2, progress=False)
    assert limited.metrics == pytest.approx({"top1": 100.0, "top5": 100.0}) and limited.limited


def test_ssv2_list_name(tmp_path):
    root = _write_dataset(tmp_path / "ssv2", list_name="something_v2_val_cluster.txt")
    result = evaluate("rsanet_r50_ssv2_16f", root, model=Oracle(), options={"num_frames": 2}, progress=False)
    assert result.dataset == "ssv2" and result.metrics["top1"] == pytest.approx(60.0)
    assert {r.metric: r.reported for r in result.rows} == {"top1": 66.0, "top5": 89.9}


def test_dataset_errors_name_what_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="something_val_cluster.txt"):
        evaluate("rsanet_r50_ssv1_16f", tmp_path, model=Oracle(), progress=False)
    (tmp_path / "something_val_cluster.txt").write_text("a 3\n")
    with pytest.raises(DatasetError, match=r"something_val_cluster.txt:1: malformed line"):
        evaluate("rsanet_r50_ssv1_16f", tmp_path, model=Oracle(), progress=False)
    (tmp_path / "something_val_cluster.txt").write_text("a 3 1\n")
    with pytest.raises(DatasetError, match=r"img_00001.jpg"):
        evaluate("rsanet_r50_ssv1_16f", tmp_path, model=Oracle(), progress=False)
    with pytest.raises(ValueError, match="unknown ssv protocol option"):
        evaluate("rsanet_r50_ssv1_16f", tmp_path, model=Oracle(), options={"crops": 3}, progress=False)


def test_cli_convert_then_eval_tiny_rsanet(tmp_path, capsys):
    """Original-format checkpoint of a tiny RSANet -> zoo convert -> zoo eval on the tiny dataset."""
    from zoo.cli import main

    root = _write_dataset(tmp_path / "ssv1")
    torch.manual_seed(0)
    small = RSANet(num_classes=NUM_CLASSES, num_segments=4, layers=(1, 1, 1, 1), width_div=16,
                   rsa_positions=((0,), (0,), (), ()), nh=2, stochastic_depth=0.0)
    state = OrderedDict(("module." + k, v) for k, v in small.state_dict().items())
    src = tmp_path / "resnet_rgb_model_best.pth.tar"
    torch.save({"epoch": 1, "arch": "ResNet", "state_dict": state, "best_prec1": 0.0}, src)
    out = tmp_path / "converted"
    assert main(["convert", "--from", "rsa", str(src), "--out", str(out), "--model", "rsanet_r50_ssv1_16f",
                 "--kwargs", json.dumps({"num_segments": 4})]) == 0
    model = zoo.create_model("rsanet_r50_ssv1_16f", weights=str(out))
    assert model.num_segments == 4 and model.num_classes == NUM_CLASSES
    capsys.readouterr()
    assert main(["eval", "rsanet_r50_ssv1_16f", "--weights", str(out), "--data", str(root), "--limit", "2",
                 "--options", json.dumps({"num_frames": 4}), "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "top1" in table and "54" in table
    metrics = json.loads((tmp_path / "r.json").read_text())
    assert metrics["num_samples"] == 2
