"""Re-id evaluation end to end on tiny CUHK03 / Market-1501 datasets written in their original formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zoo.config import ModelConfig
from zoo.data.reid import load_reid_image, read_cuhk03, read_market1501
from zoo.errors import DatasetError
from zoo.eval.protocol import get_protocol
from zoo.eval.reid import ReidProtocol, cmc, cosine_distance, mean_ap
from zoo.eval.runner import evaluate, run_protocol

# Identity colours; after ImageNet normalisation their directions differ, so the cosine distance of
# the mean-colour "feature" separates identities.
COLOURS = {1: (230, 20, 20), 2: (20, 230, 20), 3: (20, 20, 230), 4: (230, 230, 20)}
FAR = (128, 20, 200)  # distractors


def _save(path, colour, size=(20, 40), fmt=None):
    """A solid-colour image of size (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


def _near(colour):
    return tuple(min(255, c + 12) for c in colour)


class MeanColour(nn.Module):
    """A stand-in re-id model: the feature of an image is its mean (normalised) colour, [B, 3]."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


CONFIG = ModelConfig(name="toy", family="rga", task="re-id",
                     preprocessing={"input_size": [32, 16], "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"})


def write_market(root):
    """Market-1501 layout. Per identity k: a query in camera 1; in the gallery the same-id same-camera
    copy (filtered), a true match in camera 2 (slightly different colour), and a junk image (-1)
    with exactly the query's colour, which would rank first if it were not dropped. Plus distractors."""
    root = root / "Market-1501-v15.09.15"
    for pid, colour in COLOURS.items():
        _save(root / "query" / f"{pid:04d}_c1s1_000{pid}01_00.jpg", colour)
        _save(root / "bounding_box_test" / f"{pid:04d}_c1s1_000{pid}51_00.jpg", colour)
        _save(root / "bounding_box_test" / f"{pid:04d}_c2s1_000{pid}01_00.jpg", _near(colour))
        _save(root / "bounding_box_test" / f"-1_c3s1_000{pid}01_00.jpg", colour)
    for i in range(3):
        _save(root / "bounding_box_test" / f"0000_c{i + 1}s2_00000{i}_00.jpg", FAR)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0\1")  # shipped with the real archive
    return root


def write_cuhk03(root, subset="labeled"):
    """CUHK03 new-protocol layout: the split .mat (1-based indices) + the extracted PNG images."""
    from scipy.io import savemat

    names, labels = [], []
    for pid, colour in COLOURS.items():
        for view, img in ((1, 1), (1, 2), (2, 6)):
            name = f"1_{pid:03d}_{view}_{img:02d}.png"
            _save(root / f"images_{subset}" / name, colour if view == 1 else _near(colour), size=(24, 48))
            names.append(name)
            labels.append(pid * 10)  # the .mat labels, kept as they are for query / gallery
    for i in range(2):  # training images (not used by the test split)
        name = f"2_{i + 1:03d}_1_01.png"
        _save(root / f"images_{subset}" / name, FAR, size=(24, 48))
        names.append(name)
        labels.append(900 + i)
    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = names
    # queries: the first image of each identity (view 1), listed in reverse identity order
    query_idx = [3 * (pid - 1) + 1 for pid in sorted(COLOURS, reverse=True)]
    gallery_idx = [i + 1 for i in range(len(COLOURS) * 3) if i % 3 != 0]
    savemat(root / f"cuhk03_new_protocol_config_{subset}.mat", {
        "filelist": filelist, "labels": np.array(labels, dtype=np.float64).reshape(-1, 1),
        "train_idx": np.array([13.0, 14.0]).reshape(-1, 1), "query_idx": np.array(query_idx, float).reshape(-1, 1),
        "gallery_idx": np.array(gallery_idx, float).reshape(-1, 1), "camId": np.ones((len(names), 1))})
    return root


def _protocol(data_dir, **options):
    return ReidProtocol(data_dir, CONFIG, options)


def test_protocol_is_registered():
    assert get_protocol("reid") is ReidProtocol


def test_market_reader_rules(tmp_path):
    root = write_market(tmp_path)
    split = read_market1501(tmp_path)  # the parent folder works too
    assert split == read_market1501(root)
    assert [(i.pid, i.camid) for i in split.query] == [(1, 1), (2, 1), (3, 1), (4, 1)]
    assert all(i.pid != -1 for i in split.gallery)  # junk dropped
    assert sum(i.pid == 0 for i in split.gallery) == 3  # distractors kept
    assert len(split.gallery) == 4 * 2 + 3
    assert sum(i.pid == -1 for i in read_market1501(root, keep_junk=True).gallery) == 4


def test_market_end_to_end_with_junk_and_same_camera_rules(tmp_path):
    write_market(tmp_path)
    metrics, n = run_protocol(MeanColour(), _protocol(tmp_path, dataset="market1501"), batch_size=3, progress=False)
    assert n == 4 + 11
    # same-id same-camera copies are filtered and junk is dropped, so every query finds its
    # camera-2 match first
    assert metrics == pytest.approx({"rank1": 100.0, "rank5": 100.0, "rank10": 100.0, "mAP": 100.0})
    # keeping junk (an identical-colour non-match) pushes every true match to rank 2
    kept, _ = run_protocol(MeanColour(), _protocol(tmp_path, dataset="market1501", keep_junk=True), progress=False)
    assert kept["rank1"] == 0.0 and kept["rank5"] == 100.0 and kept["mAP"] == pytest.approx(50.0)
    # the legacy (scikit-learn 0.18.1) AP of a single match at rank 2 is 0.25
    legacy, _ = run_protocol(MeanColour(), _protocol(tmp_path, dataset="market1501", keep_junk=True,
                                                     legacy_sklearn=True), progress=False)
    assert legacy["mAP"] == pytest.approx(25.0)


@pytest.mark.parametrize("subset", ["labeled", "detected"])
def test_cuhk03_reader_and_end_to_end(tmp_path, subset):
    write_cuhk03(tmp_path, subset)
    split = read_cuhk03(tmp_path, subset)
    assert [(i.pid, i.camid) for i in split.query] == [(40, 1), (30, 1), (20, 1), (10, 1)]  # query_idx order
    assert [(i.pid, i.camid) for i in split.gallery][:2] == [(10, 1), (10, 2)]  # camera = view field
    assert split.query[0].path.endswith(f"images_{subset}/1_004_1_01.png")
    metrics, _ = run_protocol(MeanColour(), _protocol(tmp_path, dataset=f"cuhk03_{subset}"), progress=False)
    # the view-1 gallery copy has the query's exact colour but is same-id same-camera: filtered
    assert metrics == pytest.approx({"rank1": 100.0, "rank5": 100.0, "rank10": 100.0, "mAP": 100.0})


def test_missing_or_malformed_datasets_name_what_is_expected(tmp_path):
    with pytest.raises(DatasetError, match="cuhk03_new_protocol_config_labeled.mat"):
        read_cuhk03(tmp_path, "labeled")
    (tmp_path / "cuhk03_new_protocol_config_detected.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="images_detected"):
        read_cuhk03(tmp_path, "detected")
    (tmp_path / "images_detected").mkdir()
    with pytest.raises(DatasetError, match="MATLAB"):
        read_cuhk03(tmp_path, "detected")
    with pytest.raises(DatasetError, match="bounding_box_test"):
        read_market1501(tmp_path)
    _save(tmp_path / "m" / "query" / "0001_c1s1_000101_00.jpg", (1, 2, 3))
    _save(tmp_path / "m" / "bounding_box_test" / "person1.jpg", (1, 2, 3))
    with pytest.raises(DatasetError, match="person1.jpg"):
        read_market1501(tmp_path / "m")
    with pytest.raises(ValueError, match="unknown reid protocol option"):
        _protocol(tmp_path, datset="market1501")
    with pytest.raises(ValueError, match="unknown dataset"):
        _protocol(tmp_path, dataset="dukemtmc")


def test_preprocessing_resizes_bilinear_and_normalises(tmp_path):
    path = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    x = load_reid_image(str(path), (32, 16))
    expected = np.asarray(Image.fromarray(pixels).resize((16, 32), Image.BILINEAR), dtype=np.float32) / 255
    expected = (expected - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert x.shape == (3, 32, 16)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, rtol=0, atol=1e-5)
    # already at the target size: no resampling at all
    same = load_reid_image(str(path), (40, 20))
    np.testing.assert_allclose(same[0].numpy(), (pixels[..., 0] / 255 - 0.485) / 0.229, rtol=0, atol=1e-5)


def test_limit_keeps_queries_and_their_gallery(tmp_path):
    write_market(tmp_path)
    protocol = ReidProtocol(tmp_path, CONFIG, {"dataset": "market1501"}, limit=6)
    samples = protocol.dataset()
    assert len(samples) == 6
    metas = [samples[i][1] for i in range(len(samples))]
    assert [m[:2] for m in metas if m[0]] == [(True, 1), (True, 2), (True, 3)]
    assert sorted(m[1] for m in metas if not m[0]) == [1, 2, 3]  # the gallery of those identities first


def test_tiny_rga_model_through_the_runner_equals_direct_computation(tmp_path):
    """The real RGA-SC network (small widths, 64x32 input) through `zoo eval`'s runner; the metrics
    equal features extracted by hand + the fixture-checked metric functions."""
    import zoo

    write_market(tmp_path)
    torch.manual_seed(0)
    model = zoo.create_model("rga_sc_resnet50", num_classes=5, height=64, width=32, width_div=16,
                             cha_ratio=2, spa_ratio=2, down_ratio=2).eval()
    result = evaluate("rga_sc_resnet50", tmp_path, model=model, progress=False, batch_size=4,
                      options={"dataset": "market1501", "input_size": [64, 32]})
    assert result.dataset == "market1501" and result.num_samples == 15
    reported = {r.metric: r.reported for r in result.rows}
    assert reported["rank1"] == 96.1 and reported["mAP"] == 88.4

    split = read_market1501(tmp_path)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def features(images):
        batch = []
        for image in images:
            pixels = Image.open(image.path).convert("RGB").resize((32, 64), Image.BILINEAR)
            batch.append(((np.asarray(pixels, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
        with torch.no_grad():
            return model(torch.tensor(np.stack(batch), dtype=torch.float32))

    distmat = cosine_distance(features(split.query), features(split.gallery))
    ids = lambda part: np.array([i.pid for i in part])  # noqa: E731
    cams = lambda part: np.array([i.camid for i in part])  # noqa: E731
    args = (distmat, ids(split.query), ids(split.gallery), cams(split.query), cams(split.gallery))
    curve = cmc(*args, first_match_break=True)
    expected = {"rank1": 100 * curve[0], "rank5": 100 * curve[4], "rank10": 100 * curve[9], "mAP": 100 * mean_ap(*args)}
    assert result.metrics == pytest.approx(expected, abs=1e-4)


def test_zoo_convert_then_zoo_eval_on_tiny_market(tmp_path, capsys):
    """`python -m zoo convert --from rga` of a small original-format checkpoint, then
    `python -m zoo eval` from the converted folder on a Market-1501 folder (both in-process)."""
    import json
    from collections import OrderedDict

    import zoo
    from zoo.cli import main as cli_main

    write_market(tmp_path / "data")
    tiny = dict(num_classes=5, height=64, width=32, width_div=16, cha_ratio=2, spa_ratio=2, down_ratio=2)
    torch.manual_seed(0)
    original = zoo.create_model("rga_sc_resnet50", **tiny).eval()
    state = OrderedDict((k, v.clone()) for k, v in original.state_dict().items() if not k.endswith("num_batches_tracked"))
    src = tmp_path / "checkpoint_600.pth.tar"
    torch.save({"state_dict": state, "epoch": 600, "best_top1": 0, "optimizer": {"state": {}, "param_groups": []}},
               src, _use_new_zipfile_serialization=False)
    folder = tmp_path / "converted"
    kwargs = json.dumps({k: v for k, v in tiny.items() if k != "num_classes"})
    assert cli_main(["convert", "--from", "rga", str(src), "--out", str(folder), "--kwargs", kwargs]) == 0
    out = tmp_path / "result.json"
    options = json.dumps({"dataset": "market1501", "input_size": [64, 32]})
    assert cli_main(["eval", "rga_sc_resnet50", "--weights", str(folder), "--data", str(tmp_path / "data"),
                     "--options", options, "--out", str(out), "--no-progress", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "rank1" in printed and "96.10" in printed  # the reported Market-1501 number is shown beside ours
    result = json.loads(out.read_text())
    direct = evaluate("rga_sc_resnet50", tmp_path / "data", model=original, progress=False,
                      options={"dataset": "market1501", "input_size": [64, 32]})
    assert result["metrics"] == pytest.approx(direct.metrics, abs=1e-9)
