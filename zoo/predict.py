"""``python -m zoo predict NAME --image IMG --out OUT.png``: run a model on one image and draw the result.

Detection models (DETR): boxes with score >= threshold, labelled with COCO class names.
Image classifiers: the top-5 class ids with probabilities written on the image.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from zoo.config import Preprocessing
from zoo.data.coco import COCO_CLASSES
from zoo.data.transforms import classification_eval_transform, detection_eval_transform
from zoo.factory import create_model
from zoo.models.detr import DETR, PostProcess
from zoo.registry import model_info, split_name

__all__ = ["predict", "detect", "draw_detections"]

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40)]


def _load_image(image_path):
    from PIL import Image, UnidentifiedImageError

    path = Path(image_path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image: {exc}") from exc


@torch.no_grad()
def detect(model: nn.Module, image, threshold: float = 0.7, device: Union[str, torch.device] = "cpu",
           preprocessing: Optional[Mapping] = None) -> list[dict]:
    """DETR on one PIL RGB image -> detections with score >= threshold, best first.

    Each: ``{"label": COCO name, "category_id": int, "score": float, "box": [x0, y0, x1, y1]}``
    in pixels of the given image. ``preprocessing``: a :class:`~zoo.config.Preprocessing` or its fields.
    """
    x = detection_eval_transform(Preprocessing.parse(preprocessing or {}, "detect: preprocessing"))(image)
    outputs = model([x.to(device)])
    det = PostProcess()(outputs, torch.tensor([[image.height, image.width]], device=device))[0]
    keep = det["scores"] >= threshold
    order = det["scores"][keep].argsort(descending=True)
    found = []
    for score, label, box in zip(det["scores"][keep][order].tolist(), det["labels"][keep][order].tolist(),
                                 det["boxes"][keep][order].tolist()):
        name = COCO_CLASSES[label] if 0 <= label < len(COCO_CLASSES) else f"class {label}"
        found.append({"label": name, "category_id": int(label), "score": float(score), "box": box})
    return found


def draw_detections(image, detections: list[dict]):
    """A copy of the PIL image with each detection's box and 'label score' drawn on it."""
    from PIL import ImageDraw

    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(image.size) / 200))
    for det in detections:
        color = _PALETTE[det["category_id"] % len(_PALETTE)]
        x0, y0, x1, y1 = det["box"]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle([x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 2], fill=color)
        draw.text((x0 + 2, ty), text, fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def _classify(model: nn.Module, image, device, preprocessing: Preprocessing) -> list[dict]:
    x = classification_eval_transform(preprocessing)(image)  # the imagenet protocol's single centre crop
    probs = model(x[None].to(device)).softmax(-1)[0]
    top = probs.topk(min(5, probs.numel()))
    return [{"class_id": int(i), "score": float(p)} for p, i in zip(top.values.tolist(), top.indices.tolist())]


def predict(model_name_or_model: Union[str, nn.Module], image_path, out_path, threshold: float = 0.7,
            device: str = "cpu", weights: Optional[str] = None, preprocessing: Optional[Mapping] = None) -> list[dict]:
    """Run a model on one image, save the drawn result to ``out_path`` (PNG), return the predictions.

    Args:
        model_name_or_model: ``name`` or ``name.tag`` (built with its weights: the tag's, the
            default, or ``weights``), or an already built model.
        image_path: any image PIL reads.
        out_path: where the drawing goes.
        threshold: minimum score of a drawn detection.
        device: 'cpu' or 'cuda'.
        weights: weights source overriding the tag (tag, path, URL, ``hf://``).
        preprocessing: fields overriding the config's :class:`~zoo.config.Preprocessing` (needed only
            for a bare model with unusual inputs).
    Returns detections (see :func:`detect`) or, for classifiers, the top-5 ``{"class_id", "score"}``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    image = _load_image(image_path)
    if isinstance(model_name_or_model, str):
        stated = model_info(split_name(model_name_or_model)[0]).preprocessing
        model = create_model(model_name_or_model, pretrained=weights is None, weights=weights)
    elif isinstance(model_name_or_model, nn.Module):
        stated, model = Preprocessing(), model_name_or_model
    else:
        raise TypeError(f"predict needs a model name or an nn.Module, got {type(model_name_or_model).__name__}")
    pre = Preprocessing.parse({**stated, **(preprocessing or {})}, "predict: preprocessing")
    model = model.to(device).eval()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, DETR):
        result = detect(model, image, threshold, device, pre)
        draw_detections(image, result).save(out_path)
        return result

    from PIL import ImageDraw

    result = _classify(model, image, device, pre)
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    for row, r in enumerate(result):
        draw.text((4, 4 + 12 * row), f"class {r['class_id']}: {r['score']:.3f}", fill=(255, 255, 255))
    canvas.save(out_path)
    return result
