"""COCO box-AP protocol of DETR(-with-iRPE) (spec irpe §5.4), for ``python -m zoo eval``.

Per image: DETR val preprocessing (shorter side 800, longer <= 1333, bilinear, ImageNet
normalisation) -> model on a zero-padded batch -> ``PostProcess`` with the ORIGINAL image
size -> every query becomes a detection (xywh, score, category id = predicted label).
Metrics: pycocotools ``COCOeval`` (bbox) over the evaluated images, the standard summary;
AP, AP50, AP75, APs, APm, APl in percent (the iRPE README's 0.422 reads 42.2 here).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from zoo.data.coco import CocoDetection
from zoo.errors import ConfigError, DatasetError
from zoo.eval.protocol import Protocol, register_protocol
from zoo.models.detr import PostProcess

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@register_protocol("coco")
class CocoProtocol(Protocol):
    """COCO detection. Options: ``split`` ('val2017'), ``dataset`` (the name reported rows are matched
    by; default ``coco_<split>``, another for COCO-format data that is not COCO). Preprocessing from the model config
    (:meth:`Protocol.eval_transform`: DETR's resize): ``resize_shorter`` (800), ``max_size`` (1333), ``mean``,
    ``std``, ``interpolation``. Per class: AP and AP50 of each category.

    Samples are ``(image (3, H, W), {"image_id", "orig_size": (h, w)})``; predictions are dicts of
    numpy arrays (``boxes`` (Q, 4) xywh in original pixels, ``scores`` (Q,), ``labels`` (Q,)).
    """

    task = "detection"

    def __init__(self, data_dir: Path, model_config, options: dict, limit: Optional[int] = None):
        super().__init__(data_dir, model_config, options, limit)
        self.split = str(self.options.pop("split", "val2017"))
        self.dataset_name = str(self.options.pop("dataset", f"coco_{self.split}"))
        if self.options:
            raise ConfigError(f"coco protocol: unknown option(s) {sorted(self.options)} (known: split, dataset)")
        self.transform = self.eval_transform()
        self._dataset: Optional[CocoDetection] = None

    def dataset(self) -> CocoDetection:
        if self._dataset is None:
            self._dataset = CocoDetection(self.data_dir, self.split, transform=self.transform, limit=self.limit)
        return self._dataset

    def collate(self, items: list):
        """-> (list of image tensors of different sizes, list of metas); the model pads them."""
        return [image for image, _ in items], [meta for _, meta in items]

    def predict(self, model, batch, device) -> list:
        images, metas = batch
        images = [image.to(device) for image in images]
        sizes = torch.tensor([meta["orig_size"] for meta in metas], device=device)
        # Detectors other than DETR (torchvision's, e.g. the hand-raising net) post-process
        # themselves into the same per-image {scores, labels, boxes (xyxy, original pixels)}.
        if hasattr(model, "coco_predictions"):
            detections = model.coco_predictions(images, sizes)
        else:
            detections = PostProcess()(model(images), sizes)
        predictions = []
        for meta, det in zip(metas, detections):
            x0, y0, x1, y1 = det["boxes"].float().cpu().unbind(-1)
            xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)
            predictions.append({"image_id": meta["image_id"], "boxes": xywh.numpy(),
                                "scores": det["scores"].float().cpu().numpy(),
                                "labels": det["labels"].cpu().numpy().astype(np.int64)})
        return predictions

    def compute(self, predictions: list) -> dict[str, float]:
        if not predictions:
            raise DatasetError(f"coco protocol: no images were evaluated in {self.data_dir}")
        evaluator = coco_evaluate(self.dataset().coco, predictions)
        self.curves = {"pr_curve": pr_curve(evaluator)}
        self.per_class_metrics = per_category_ap(evaluator)
        return box_ap(evaluator)

    def class_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c["name"]) for c in self.dataset().coco.dataset.get("categories", [])}


def coco_box_ap(coco_gt, predictions: list) -> dict[str, float]:
    """pycocotools bbox AP family in percent over the images in ``predictions`` (undefined ones left out).

    ``predictions``: dicts with ``image_id`` and numpy ``boxes`` (N, 4) xywh, ``scores`` (N,), ``labels`` (N,).
    """
    return box_ap(coco_evaluate(coco_gt, predictions))


def coco_evaluate(coco_gt, predictions: list):
    """pycocotools ``COCOeval`` (bbox) run over the images in ``predictions`` (see :func:`coco_box_ap`):
    evaluated, accumulated and summarised."""
    from pycocotools.cocoeval import COCOeval

    results = []
    for p in predictions:
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": int(p["image_id"]), "category_id": int(label), "bbox": box,
                            "score": float(score)})
    image_ids = sorted({int(p["image_id"]) for p in predictions})
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes cannot take an empty list; an empty result set scores zero
            from pycocotools.coco import COCO

            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": list(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids  # only what was evaluated (--limit, shards gathered on rank 0)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def per_category_ap(evaluator) -> dict[int, dict[str, float]]:
    """AP and AP50 (percent) of each category with ground truth among the evaluated images."""
    precision = evaluator.eval["precision"]  # (IoU thresholds, recalls, categories, areas, max detections)
    out = {}
    for k, category in enumerate(evaluator.params.catIds):
        every, at50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]  # area 'all', 100 detections
        if (every > -1).any():
            out[int(category)] = {"AP": 100.0 * float(every[every > -1].mean()),
                                  "AP50": 100.0 * float(at50[at50 > -1].mean()) if (at50 > -1).any() else 0.0}
    return out


def box_ap(evaluator) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent from a summarised ``COCOeval``.

    pycocotools reports -1 for a size range without any ground truth among the evaluated images (e.g.
    no small objects in a --limit subset): that metric is undefined, so it is left out.
    """
    return {name: float(value) * 100.0 for name, value in zip(METRICS, evaluator.stats[:6]) if value >= 0}


def pr_curve(evaluator) -> dict:
    """Precision-recall per IoU threshold from an accumulated ``COCOeval`` (what ``pr_curve.png`` draws).

    COCOeval's interpolated precision at its 101 recall thresholds, for all areas and the largest
    detection limit, averaged over the categories that have ground truth (those with -1 are left out);
    None at a threshold where no category has any. The mean of one row is the AP at that IoU, so the
    mean over all rows is the AP of :func:`box_ap`. Returns ``{"recall": [101], "iou_thresholds": [10],
    "precision": [10][101], "area": "all", "max_dets": 100}``.
    """
    params = evaluator.params
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index("all"), -1]  # (T, R, K)
    rows = []
    for per_threshold in precision:
        row = []
        for per_recall in per_threshold:
            defined = per_recall[per_recall > -1]
            row.append(float(defined.mean()) if defined.size else None)
        rows.append(row)
    return {"recall": [float(r) for r in params.recThrs], "iou_thresholds": [float(t) for t in params.iouThrs],
            "precision": rows, "area": "all", "max_dets": int(params.maxDets[-1])}
