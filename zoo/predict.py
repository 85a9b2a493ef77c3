"""``python -m zoo predict NAME --image IMG --out OUT.png``: run a model on one image and draw the result.

The preprocessing and the class names come from the weights (``model.pretrained_cfg``, through
:func:`zoo.data.resolve_data_config` / :func:`zoo.data.create_transform`):

- detectors (DETR, the torchvision hand-raising detector): boxes with score >= threshold, drawn and
  labelled with the weights' class names (``class N`` where the weights have none);
- image classifiers: the top-5 classes with their names and probabilities, written on the image.

Re-id models (they return an embedding, not classes) and video models (they take clips) are refused
with the reason.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from zoo.data.config import TASK_KINDS, create_transform, resolve_data_config
from zoo.errors import ConfigError
from zoo.factory import create_model
from zoo.models._inputs import check_finite
from zoo.models.detr import DETR, PostProcess

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
        raise ConfigError(f"{path} is not a readable image: {exc}") from exc


def _label(label_names: Optional[Sequence[str]], class_id: int) -> str:
    return label_names[class_id] if label_names is not None and 0 <= class_id < len(label_names) else f"class {class_id}"


def _label_names(model: nn.Module) -> Optional[Sequence[str]]:
    return getattr(getattr(model, "pretrained_cfg", None), "label_names", None)


@torch.no_grad()
def detect(model: nn.Module, image, threshold: float = 0.7, device: Union[str, torch.device] = "cpu",
           preprocessing: Optional[Mapping] = None) -> list[dict]:
    """A detector on one PIL RGB image -> detections with score >= threshold, best first.

    Each: ``{"label": class name, "category_id": int, "score": float, "box": [x0, y0, x1, y1]}`` in
    pixels of the given image; names from the weights (``model.pretrained_cfg.label_names``).
    ``preprocessing``: data-config keys overriding the weights' (:func:`zoo.data.resolve_data_config`).
    """
    config = resolve_data_config(model=model, **{"task": "detection", **(preprocessing or {})})
    x = create_transform(config)(image).to(device)
    check_finite(x, type(model).__name__)
    size = torch.tensor([[image.height, image.width]], device=device)
    if hasattr(model, "coco_predictions"):  # a torchvision detector: it resizes and post-processes itself
        det = model.coco_predictions([x], size)[0]
    else:
        det = PostProcess()(model([x]), size)[0]
    keep = det["scores"] >= threshold
    order = det["scores"][keep].argsort(descending=True)
    names = _label_names(model)
    found = []
    for score, label, box in zip(det["scores"][keep][order].tolist(), det["labels"][keep][order].tolist(),
                                 det["boxes"][keep][order].tolist()):
        found.append({"label": _label(names, int(label)), "category_id": int(label), "score": float(score), "box": box})
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
def _classify(model: nn.Module, image, device, preprocessing: Mapping) -> list[dict]:
    config = resolve_data_config(model=model, **preprocessing)
    x = create_transform(config)(image)  # the imagenet protocol's single centre crop
    probs = model(x[None].to(device)).softmax(-1)[0]
    top = probs.topk(min(5, probs.numel()))
    names = _label_names(model)
    return [{"class_id": int(i), "label": _label(names, int(i)), "score": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())]


def _task_kind(model: nn.Module, preprocessing: Mapping) -> str:
    task = preprocessing.get("task") or getattr(getattr(model, "pretrained_cfg", None), "task", None)
    if isinstance(model, DETR) or hasattr(model, "coco_predictions"):
        return "detection"
    return TASK_KINDS.get(task or "image classification", "classification")


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
        preprocessing: data-config keys (:func:`zoo.data.resolve_data_config`) overriding the
            weights' preprocessing (needed only for a bare model with unusual inputs).
    Returns detections (see :func:`detect`) or, for classifiers, the top-5 ``{"class_id", "label", "score"}``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    image = _load_image(image_path)
    if isinstance(model_name_or_model, str):
        model = create_model(model_name_or_model, pretrained=weights is None, weights=weights)
    elif isinstance(model_name_or_model, nn.Module):
        model = model_name_or_model
    else:
        raise ConfigError(f"predict needs a model name or an nn.Module, got {type(model_name_or_model).__name__}")
    preprocessing = dict(preprocessing or {})
    kind = _task_kind(model, preprocessing)
    if kind not in ("detection", "classification"):
        what = {"reid": "a person re-identification model (it returns an embedding, not classes)",
                "video": "a video model (it takes clips of frames, not one image)"}[kind]
        raise ConfigError(f"predict runs detectors and image classifiers; this is {what}")
    model = model.to(device).eval()

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "detection":
        result = detect(model, image, threshold, device, preprocessing)
        draw_detections(image, result).save(out_path)
        return result

    from PIL import ImageDraw

    result = _classify(model, image, device, preprocessing)
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    for row, r in enumerate(result):
        draw.text((4, 4 + 12 * row), f"{r['label']}: {r['score']:.3f}", fill=(255, 255, 255))
    canvas.save(out_path)
    return result
