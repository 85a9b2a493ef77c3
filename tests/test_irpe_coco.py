"""COCO reader + box-AP protocol end to end on a tiny COCO-2017-layout dataset written here."""
from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402

import zoo  # noqa: E402
from zoo.data.coco import COCO_CLASSES, CocoDetection, detr_resize_size  # noqa: E402
from zoo.errors import DatasetError  # noqa: E402
from zoo.eval.coco import CocoProtocol, coco_box_ap  # noqa: E402
from zoo.eval.protocol import get_protocol  # noqa: E402

TINY = dict(hidden_dim=16, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=5,
            backbone_width_div=16)
# (id, file, width, height, [(category, [x, y, w, h])])
IMAGES = [
    (139, "000000000139.jpg", 64, 48, [(1, [4, 4, 20, 30]), (3, [30, 10, 30, 20])]),
    (285, "000000000285.jpg", 50, 80, [(18, [10, 20, 30, 40])]),
    (42, "000000000042.jpg", 40, 40, [(1, [0, 0, 40, 40]), (62, [2, 3, 5, 6])]),
]


def write_coco(root: Path, as_zip: bool = False) -> Path:
    """COCO 2017 layout: annotations/instances_val2017.json + val2017/*.jpg (or val2017.zip)."""
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns, ann_id = [], [], 1
    files = {}
    for image_id, name, w, h, boxes in IMAGES:
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        files[name] = arr
        for cat, box in boxes:
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": float(box[2] * box[3]), "iscrowd": 0})
            ann_id += 1
    cats = [{"id": i, "name": COCO_CLASSES[i], "supercategory": "x"} for i in (1, 3, 18, 62)]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    if as_zip:
        with zipfile.ZipFile(root / "val2017.zip", "w") as zf:
            for name, arr in files.items():
                tmp = root / name
                Image.fromarray(arr).save(tmp, quality=95)
                zf.write(tmp, f"val2017/{name}")
                tmp.unlink()
    else:
        (root / "val2017").mkdir()
        for name, arr in files.items():
            Image.fromarray(arr).save(root / "val2017" / name, quality=95)
    return root


def small_config(name="detr_r50_irpe_product_ctx_9x9", shorter=96, max_size=160):
    cfg = zoo.model_info(name)
    return dataclasses.replace(cfg, preprocessing={**cfg.preprocessing, "resize_shorter": shorter, "max_size": max_size})


def test_resize_rule():
    assert detr_resize_size(640, 480) == (800, 1066)  # (h, w): shorter 800, longer truncated
    assert detr_resize_size(480, 640) == (1066, 800)
    assert detr_resize_size(2000, 500) == (333, 1332)  # longer side capped at 1333
    assert detr_resize_size(1066, 800) == (800, 1066)  # already there: unchanged
    assert detr_resize_size(50, 80, 96, 160) == (153, 96)


def test_class_names():
    assert len(COCO_CLASSES) == 91 and COCO_CLASSES[1] == "person" and COCO_CLASSES[90] == "toothbrush"
    assert sum(n != "N/A" for n in COCO_CLASSES) == 80 and COCO_CLASSES[12] == "N/A"


def test_reader_folder_and_zip_agree(tmp_path):
    folder = CocoDetection(write_coco(tmp_path / "a"))
    archive = CocoDetection(write_coco(tmp_path / "b", as_zip=True))
    assert folder.ids == archive.ids == [42, 139, 285]  # sorted image ids, like DETR
    for i in range(3):
        (img_a, meta_a), (img_b, meta_b) = folder[i], archive[i]
        assert meta_a == meta_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert folder[1][1] == {"image_id": 139, "orig_size": (48, 64)}
    assert len(CocoDetection(tmp_path / "a", limit=2)) == 2
    # pickles without the open zip handle (DataLoader workers)
    import pickle

    clone = pickle.loads(pickle.dumps(archive))
    assert clone[0][1] == archive[0][1]


def test_reader_errors(tmp_path):
    with pytest.raises(DatasetError, match="annotations/instances_val2017.json"):
        CocoDetection(tmp_path)
    root = write_coco(tmp_path / "c")
    for f in (root / "val2017").iterdir():
        f.unlink()
    (root / "val2017").rmdir()
    with pytest.raises(DatasetError, match=r"val2017\.zip"):
        CocoDetection(root)
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    (root / "val2017").mkdir()
    with pytest.raises(DatasetError, match="not a readable COCO annotation JSON"):
        CocoDetection(root)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="missing"):
        CocoDetection(root)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "gone.jpg", "width": 4, "height": 4}], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="gone.jpg"):
        CocoDetection(root)[0]


def test_perfect_predictions_score_100(tmp_path):
    ds = CocoDetection(write_coco(tmp_path))
    preds = []
    for image_id, _, _, _, boxes in IMAGES:
        preds.append({"image_id": image_id, "boxes": np.array([b for _, b in boxes], dtype=np.float32),
                      "scores": np.ones(len(boxes), dtype=np.float32),
                      "labels": np.array([c for c, _ in boxes], dtype=np.int64)})
    metrics = coco_box_ap(ds.coco, preds)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP50"] == pytest.approx(100.0)
    # wrong class everywhere -> 0
    wrong = [{**p, "labels": np.full_like(p["labels"], 5)} for p in preds]
    assert coco_box_ap(ds.coco, wrong)["AP"] == 0.0
    # only some images evaluated (--limit): AP over those only
    assert coco_box_ap(ds.coco, preds[:1])["AP"] == pytest.approx(100.0)


def test_protocol_end_to_end(tmp_path):
    root = write_coco(tmp_path)
    assert get_protocol("coco") is CocoProtocol
    protocol = CocoProtocol(root, small_config(), {}, limit=None)
    assert protocol.dataset_name == "coco_val2017"
    ds = protocol.dataset()
    assert len(ds) == 3
    image, meta = ds[2]  # image 285: 50 x 80 (w x h) -> shorter side 96
    assert image.shape == (3, 153, 96) and meta["orig_size"] == (80, 50)
    torch.manual_seed(0)
    model = zoo.create_model("detr_r50_irpe", **TINY).eval()
    batch = protocol.collate([ds[i] for i in range(3)])
    with torch.no_grad():
        preds = protocol.predict(model, batch, torch.device("cpu"))
    assert [p["image_id"] for p in preds] == [42, 139, 285]
    assert preds[0]["boxes"].shape == (5, 4) and preds[0]["scores"].shape == (5,)
    # boxes are in original pixels: within (a little around) the 40x40 image
    assert np.all(preds[0]["boxes"][:, 2:] <= 40 + 1e-3)
    metrics = protocol.compute(preds)
    assert set(metrics) <= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and "AP" in metrics
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    with pytest.raises(ValueError, match="unknown option"):
        CocoProtocol(root, small_config(), {"year": 2014})
    # COCO-format data that is not COCO names itself, so reported rows of another dataset never match
    assert CocoProtocol(root, small_config(), {"dataset": "shapes_det_val"}).dataset_name == "shapes_det_val"


def test_through_runner(tmp_path):
    runner = pytest.importorskip("zoo.eval.runner")
    root = write_coco(tmp_path / "coco", as_zip=True)
    torch.manual_seed(0)
    model = zoo.create_model("detr_r50_irpe", **TINY).eval()
    out = tmp_path / "results.json"
    result = runner.evaluate("detr_r50_irpe_product_ctx_9x9.coco_300ep", root, model=model, batch_size=2, limit=2,
                             out=out, progress=False)
    rows = {r.metric: r for r in result.rows}
    assert rows["AP"].reported == 42.2 and rows["AP"].difference == pytest.approx(rows["AP"].reproduced - 42.2)
    assert result.num_samples == 2 and result.limited
    saved = json.loads(out.read_text())
    assert saved["metrics"]["AP"] == rows["AP"].reproduced
