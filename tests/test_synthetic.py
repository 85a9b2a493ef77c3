"""Synthetic mini datasets (zoo.data.synthetic): determinism, on-disk formats read back by the real readers, CLI."""
from __future__ import annotations

import hashlib
import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoo.data import synthetic
from zoo.data.synthetic import DATASETS, MARKER, dataset_info, make_dataset
from zoo.errors import DatasetError

KINDS = sorted(DATASETS)


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> folder of the tiny dataset (both splits, seed 0), generated once per module."""
    cache = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = make_dataset(kind, tmp_path_factory.mktemp(kind) / "data", size="tiny")
        return cache[kind]

    return get


# ---------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes_and_splits_independent(kind, tiny, tmp_path):
    full = tree_hashes(tiny(kind))
    # val alone, then train into the same folder: byte-identical to generating 'all' at once
    separate = tmp_path / "separate"
    make_dataset(kind, separate, split="val", size="tiny")
    val_only = tree_hashes(separate)
    assert {k: v for k, v in full.items() if k in val_only and k != MARKER} == \
           {k: v for k, v in val_only.items() if k != MARKER}
    make_dataset(kind, separate, split="train", size="tiny")
    assert tree_hashes(separate) == full
    # another seed gives other images: no image of seed 1 equals one of seed 0
    other = tree_hashes(make_dataset(kind, tmp_path / "other", split="val", seed=1, size="tiny"))

    def images(hashes):
        return {v for k, v in hashes.items() if k.lower().endswith((".jpg", ".jpeg"))}

    assert images(other) and not images(other) & images(val_only)


def test_regenerating_a_split_leaves_no_stale_files(tmp_path):
    out = tmp_path / "clips"
    make_dataset("moving-shapes", out, split="val", seed=3, size="tiny")
    make_dataset("moving-shapes", out, split="val", seed=4, size="tiny")
    assert tree_hashes(out) == tree_hashes(make_dataset("moving-shapes", tmp_path / "fresh", split="val", seed=4,
                                                        size="tiny"))


def test_refuses_foreign_or_other_kind_folders(tmp_path):
    foreign = tmp_path / "coco"
    (foreign / "val2017").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not empty"):
        make_dataset("shapes-det", foreign, size="tiny")
    assert not (foreign / MARKER).exists()
    out = make_dataset("shapes-cls", tmp_path / "cls", split="val", size="tiny")
    with pytest.raises(DatasetError, match="shapes-cls"):
        make_dataset("shapes-det", out, size="tiny")


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "shapes"}, "unknown synthetic dataset kind 'shapes'"),
    ({"split": "test"}, "split must be one of"),
    ({"size": "huge"}, "size must be one of"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
])
def test_bad_arguments_are_named(kwargs, match, tmp_path):
    args = {"kind": "shapes-cls", "out": tmp_path / "x", **kwargs}
    with pytest.raises(ValueError, match=match):
        make_dataset(**args)


def test_every_generator_documents_its_chance_level():
    for kind, generator in DATASETS.items():
        assert "Chance" in (generator.__doc__ or ""), kind


# ---------------------------------------------------------------------------------------------
# the real readers read what we write


@pytest.mark.parametrize("kind", ["shapes-det", "raised-hands"])
def test_coco_kinds_read_back_and_boxes_are_exact(kind, tiny):
    pytest.importorskip("pycocotools")
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from zoo.data.coco import CocoDetection

    root = tiny(kind)
    info = dataset_info(root)
    expected_cats = synthetic.DET_CATEGORIES if kind == "shapes-det" else synthetic.HAND_CATEGORIES
    for split in ("train", "val"):
        data = CocoDetection(root, f"{split}2017")
        counts = info["splits"][split]["counts"]
        assert len(data) == counts["images"] and len(data.coco.anns) == counts["boxes"] > 0
        assert data.coco.loadCats(data.coco.getCatIds()) == expected_cats
        image, meta = data[len(data) - 1]
        assert meta["orig_size"] == (image.height, image.width)
        for ann in data.coco.anns.values():
            img = data.coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= img["width"] and y + h <= img["height"]
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    # the ground truth, submitted as detections, scores AP 100 through pycocotools
    coco = CocoDetection(root, "val2017").coco
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco.anns.values()]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)
    assert info["splits"]["val"]["chance"] == {"AP": 0.0}


_MARKET = re.compile(r"^(-1|\d{4})_c([1-6])s\d_\d{6}_\d{2}\.jpg$")


def test_shapes_reid_is_market1501(tiny):
    from zoo.data.reid import read_market1501

    root = tiny("shapes-reid")
    counts = dataset_info(root)["splits"]["val"]["counts"]
    split = read_market1501(root)
    assert len(split.query) == counts["query"]
    assert len(split.gallery) == counts["gallery"] - counts["junk"]  # the reader drops junk (-1)
    assert len(read_market1501(root, keep_junk=True).gallery) == counts["gallery"]
    folders = ("bounding_box_train", "query", "bounding_box_test")
    names = [p.name for folder in folders for p in (root / folder).iterdir()]
    assert all(_MARKET.match(n) for n in names)
    train_pids = {int(n.split("_")[0]) for n in (p.name for p in (root / "bounding_box_train").iterdir())}
    test_pids = {q.pid for q in split.query}
    assert len(train_pids) == 6 and len(test_pids) == counts["identities"] == 6 and not train_pids & test_pids
    assert sum(g.pid == 0 for g in split.gallery) == counts["distractors"]
    # every query has a match in another camera (the Market rule ignores same id + same camera)
    for q in split.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in split.gallery), q
    chance = dataset_info(root)["splits"]["val"]["chance"]
    assert 0 < chance["rank1"] < 50 and 0 < chance["mAP"] < 50
    from zoo.data.reid import read_market1501_train

    assert len(read_market1501_train(root)) == dataset_info(root)["splits"]["train"]["counts"]["images"]


def test_expected_random_ap_matches_enumeration():
    for n, m in [(1, 1), (3, 1), (4, 2), (5, 3), (6, 6)]:
        aps = []
        for relevant in itertools.combinations(range(n), m):
            hits = sorted(relevant)
            aps.append(np.mean([(k + 1) / (pos + 1) for k, pos in enumerate(hits)]))
        assert synthetic._expected_random_ap(n, m) == pytest.approx(float(np.mean(aps)), abs=1e-12)


def test_moving_shapes_is_something_something_layout(tiny):
    root = tiny("moving-shapes")
    info = dataset_info(root)
    classes = (root / "something-something-v1-labels.csv").read_text().splitlines()
    assert classes == synthetic.VIDEO_CLASSES
    for split, listing in (("train", "something_train_cluster.txt"), ("val", "something_val_cluster.txt")):
        lines = (root / listing).read_text().splitlines()
        assert len(lines) == info["splits"][split]["counts"]["videos"] == len(classes)
        labels = []
        for line in lines:
            video_dir, num_frames, label = line.split(" ")
            frames = sorted(p.name for p in (root / video_dir).iterdir())
            assert frames == [f"img_{i:05d}.jpg" for i in range(1, int(num_frames) + 1)]
            assert int(num_frames) > 16  # the original's val sampling needs more frames than segments
            labels.append(int(label))
        assert sorted(labels) == list(range(len(classes)))
    assert info["splits"]["val"]["chance"] == {"top1": 12.5, "top5": 62.5}
    # the shared split reader (used by the ssv protocol and by zoo train) reads the same clips
    from zoo.data.ssv import read_split

    clips = read_split(root / "something_train_cluster.txt", root)
    assert [(c.path.name, c.label) for c in clips] == \
           [(line.split(" ")[0].split("/")[1], int(line.split(" ")[2]))
            for line in (root / "something_train_cluster.txt").read_text().splitlines()]


def test_shapes_cls_is_imagenet_layout(tiny):
    from zoo.data.imagefolder import ImageFolder

    root = tiny("shapes-cls")
    info = dataset_info(root)
    for split in ("train", "val"):
        data = ImageFolder(root / split)
        assert data.classes == synthetic.CLS_WNIDS
        assert len(data) == info["splits"][split]["counts"]["images"] == (30 if split == "train" else 20)
        labels = [s.label for s in data.samples]
        assert np.bincount(labels).tolist() == [len(data) // 10] * 10
    assert all(p.name.startswith("ILSVRC2012_val_") for p in (root / "val").rglob("*.JPEG"))
    mapping = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping[0] == f"{synthetic.CLS_WNIDS[0]} {synthetic.CLS_CLASSES[0]}"
    assert info["splits"]["val"]["chance"] == {"top1": 10.0, "top5": 50.0}


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_data_make(tmp_path):
    out = tmp_path / "cls"
    result = subprocess.run([sys.executable, "-m", "zoo", "data", "make", "shapes-cls", "--out", str(out),
                             "--split", "val", "--seed", "2", "--size", "tiny"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chance top1 10%" in result.stdout and f"wrote {out}" in result.stdout
    assert tree_hashes(out) == tree_hashes(make_dataset("shapes-cls", tmp_path / "api", split="val", seed=2,
                                                        size="tiny"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from zoo.cli import main

    (tmp_path / "busy" / "x").mkdir(parents=True)
    assert main(["data", "make", "shapes-det", "--out", str(tmp_path / "busy"), "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "not empty" in err
    with pytest.raises(SystemExit):
        main(["data", "make", "no-such-kind", "--out", str(tmp_path / "y")])
