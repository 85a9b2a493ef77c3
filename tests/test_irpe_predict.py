"""`python -m zoo predict` for DETR: boxes and the weights' class names drawn on the image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo.data.labels import LABEL_SETS
from zoo.predict import draw_detections, predict

TINY = dict(hidden_dim=16, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=5,
            backbone_width_div=16)
SMALL = {"resize_shorter": 64, "max_size": 96}


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_draws_detections(image_path, tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("detr_r50_irpe", **TINY).eval()
    with torch.no_grad():  # make query 0 a confident "dog" (COCO id 18)
        model.class_embed.bias.zero_()
        model.class_embed.weight.zero_()
        model.class_embed.bias[18] = 20.0
    out = tmp_path / "out" / "drawn.png"
    # random weights have no class names: the id is printed
    assert {d["label"] for d in predict(model, image_path, out, threshold=0.5, preprocessing=SMALL)} == {"class 18"}
    model.pretrained_cfg = model.pretrained_cfg.replace(label_names=LABEL_SETS["coco"])  # as COCO weights have
    dets = predict(model, image_path, out, threshold=0.5, preprocessing=SMALL)
    assert len(dets) == 5 and all(d["label"] == "dog" and d["category_id"] == 18 for d in dets)
    assert all(d["score"] > 0.99 for d in dets)
    x0, y0, x1, y1 = dets[0]["box"]
    assert -1 <= x0 <= x1 <= 91 and -1 <= y0 <= y1 <= 61  # pixels of the original 90x60 image
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (60, 90, 3)
    assert not np.array_equal(drawn, np.asarray(Image.open(image_path).convert("RGB")))
    assert predict(model, image_path, tmp_path / "none.png", threshold=1.0, preprocessing=SMALL) == []


def test_draw_detections_keeps_input():
    img = Image.new("RGB", (40, 30))
    drawn = draw_detections(img, [{"label": "cat", "category_id": 17, "score": 0.9, "box": [5, 5, 30, 25]}])
    assert np.asarray(img).sum() == 0 and np.asarray(drawn).sum() > 0


def test_predict_errors(image_path, tmp_path):
    model = zoo.create_model("detr_r50_irpe", **TINY)
    with pytest.raises(FileNotFoundError):
        predict(model, tmp_path / "missing.jpg", tmp_path / "o.png")
    with pytest.raises(ValueError, match="threshold"):
        predict(model, image_path, tmp_path / "o.png", threshold=2)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        predict(model, bad, tmp_path / "o.png")


def test_cli_predict_with_converted_weights(image_path, tmp_path):
    """The CLI path: a name plus --weights (a converted folder)."""
    from zoo.cli import main
    from zoo.convert import save_safetensors

    model = zoo.create_model("detr_r50_irpe", **TINY)
    folder = tmp_path / "w"
    folder.mkdir()
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    import json

    (folder / "config.json").write_text(json.dumps({"model": "detr_r50_irpe", "kwargs": TINY}))
    out = tmp_path / "cli.png"
    assert main(["predict", "detr_r50_irpe", "--image", str(image_path), "--out", str(out), "--weights", str(folder),
                 "--threshold", "0.0"]) == 0
    assert out.is_file()


def test_predict_classifier_top5(image_path, tmp_path):
    model = zoo.create_model("deit_tiny_patch16_224_ctx_product_50_shared_k", img_size=32, depth=1, num_classes=7)
    top = predict(model, image_path, tmp_path / "cls.png", preprocessing={"input_size": [32, 32]})
    assert len(top) == 5 and top[0]["score"] >= top[-1]["score"] and 0 <= top[0]["class_id"] < 7
    assert (tmp_path / "cls.png").is_file()
