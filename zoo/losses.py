"""Training losses of the families, written from the specs.

* DETR (spec irpe §5.2): :class:`HungarianMatcher` pairs each ground-truth box with one query
  (costs 1 class / 5 L1 / 2 GIoU), :class:`SetCriterion` scores the pairing: cross-entropy over
  all queries (the "no object" class weighted ``eos_coef`` = 0.1) + 5 L1 + 2 GIoU on the matched
  boxes, repeated on every auxiliary decoder output.
* Re-id (spec rga §2.2): :class:`CrossEntropyLabelSmooth` (eps = 0.1) on the logits plus the
  batch-hard :class:`TripletLoss` (margin 0.3, Euclidean distance, no normalisation) on ``feat_``.

Boxes: ``cxcywh`` = (centre x, centre y, width, height), ``xyxy`` = (x0, y0, x1, y1), both
normalised to [0, 1] by the image size in the DETR losses.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from zoo.errors import ConfigError, InputError

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "HungarianMatcher", "SetCriterion",
           "CrossEntropyLabelSmooth", "TripletLoss"]


# --------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------

def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU of xyxy boxes: (N, 4), (M, 4) -> (N, M) in [-1, 1].

    GIoU = IoU - (area of the smallest enclosing box not covered by the union) / (enclosing area).
    Boxes must have x1 >= x0 and y1 >= y0 (a degenerate box would make the ratio undefined).
    """
    from torchvision.ops import generalized_box_iou as tv_giou

    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise InputError(f"generalized_box_iou: {name} must be (N, 4) xyxy, got {tuple(boxes.shape)}")
        if boxes.numel() and not bool((boxes[:, 2:] >= boxes[:, :2]).all()):
            raise InputError(f"generalized_box_iou: {name} holds boxes with x1 < x0 or y1 < y0 (not xyxy?)")
    return tv_giou(boxes1, boxes2)


def _check_targets(targets: Sequence[dict], batch: int, num_classes: Optional[int] = None) -> None:
    if len(targets) != batch:
        raise InputError(f"got {len(targets)} targets for a batch of {batch} images")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise InputError(f"target {i} must have 'labels' (n,) and 'boxes' (n, 4) normalised cxcywh; got {sorted(t)}")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or boxes.shape != (labels.shape[0], 4):
            raise InputError(f"target {i}: labels (n,) and boxes (n, 4) expected, got {tuple(labels.shape)} "
                             f"and {tuple(boxes.shape)}")
        if num_classes is not None and labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(f"target {i}: labels must be in [0, {num_classes}) (the model's classes; "
                             f"{num_classes} is 'no object'), got {labels.tolist()}")


# --------------------------------------------------------------------------------------
# DETR: matching and set loss
# --------------------------------------------------------------------------------------

class HungarianMatcher(nn.Module):
    """One-to-one assignment of ground-truth boxes to queries minimising a weighted cost.

    cost(query q, target t) = cost_class * (-p_q(label_t)) + cost_bbox * ||b_q - b_t||_1
                              + cost_giou * (-GIoU(b_q, b_t)),
    p_q the softmax over the query's logits, boxes normalised cxcywh. Solved per image with
    ``scipy.optimize.linear_sum_assignment``.

    ``forward(outputs, targets)``: ``outputs["pred_logits"]`` (B, Q, C + 1), ``outputs["pred_boxes"]``
    (B, Q, 4); ``targets`` a list of B dicts with ``labels`` (n_i,) int64 and ``boxes`` (n_i, 4).
    Returns B pairs ``(query_index (k,), target_index (k,))`` int64, k = min(Q, n_i), sorted by query.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ConfigError("HungarianMatcher: all costs are 0; at least one must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> list[tuple[Tensor, Tensor]]:
        from scipy.optimize import linear_sum_assignment

        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        _check_targets(targets, logits.shape[0])
        indices = []
        for prob, pred, target in zip(logits.softmax(-1), boxes, targets):
            labels, gt = target["labels"], target["boxes"].to(pred.dtype)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = (self.cost_class * -prob[:, labels]
                    + self.cost_bbox * torch.cdist(pred, gt, p=1)
                    + self.cost_giou * -generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt)))
            cost = cost.float().cpu()
            if not torch.isfinite(cost).all():
                raise InputError("HungarianMatcher: the cost matrix holds NaN/inf (non-finite predicted boxes or logits)")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    """DETR's set loss: Hungarian matching, then classification and box losses (spec irpe §5.2).

    Args:
        num_classes: real classes C (logits have C + 1 entries; index C = "no object").
        matcher: default ``HungarianMatcher(1, 5, 2)``.
        eos_coef: weight of the "no object" class in the cross-entropy (0.1).
        weight_ce, weight_bbox, weight_giou: weights of the three terms in the total (1, 5, 2).
        aux_loss: also apply the loss to every ``outputs["aux_outputs"]`` entry (each matched anew).

    ``forward(outputs, targets)``: ``outputs`` as :class:`HungarianMatcher` (plus ``aux_outputs``:
    a list of dicts with ``pred_logits`` / ``pred_boxes``), ``targets`` B dicts with ``labels``
    (n_i,) in [0, C) and ``boxes`` (n_i, 4) normalised cxcywh. Returns a dict of scalars:
    ``loss_ce``, ``loss_bbox``, ``loss_giou`` (unweighted; ``_0``, ``_1`` ... suffixes for the aux
    outputs) and ``loss``, the weighted sum of all of them.

    Box terms are summed over matched pairs and divided by the number of target boxes in the batch
    (at least 1); the cross-entropy is the weighted mean over all B x Q queries, as in DETR.
    """

    def __init__(self, num_classes: int, matcher: Optional[HungarianMatcher] = None, eos_coef: float = 0.1,
                 weight_ce: float = 1.0, weight_bbox: float = 5.0, weight_giou: float = 2.0, aux_loss: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"SetCriterion: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.eos_coef = eos_coef
        self.weights = {"loss_ce": weight_ce, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.aux_loss = aux_loss
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef  # "no object" is by far the most frequent target
        self.register_buffer("class_weight", class_weight)

    def _single(self, outputs: dict, targets: Sequence[dict], num_boxes: float) -> dict[str, Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or logits.shape[-1] != self.num_classes + 1:
            raise InputError(f"SetCriterion: pred_logits must be (B, Q, {self.num_classes + 1}), got {tuple(logits.shape)}")
        if boxes.shape != logits.shape[:2] + (4,):
            raise InputError(f"SetCriterion: pred_boxes must be (B, Q, 4) = {tuple(logits.shape[:2]) + (4,)}, "
                             f"got {tuple(boxes.shape)}")
        indices = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)

        # every query's target class: "no object" unless it was matched
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(
            logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.class_weight.to(logits.dtype))

        matched = boxes[batch_idx, query_idx]
        gt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(matched)
        loss_bbox = F.l1_loss(matched, gt, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(gt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        _check_targets(targets, outputs["pred_logits"].shape[0], self.num_classes)
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self._single(outputs, targets, num_boxes)
        if self.aux_loss:
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                losses.update({f"{k}_{i}": v for k, v in self._single(aux, targets, num_boxes).items()})
        # "loss_giou_3" is weighted like "loss_giou"
        losses["loss"] = sum(self.weights[k.rstrip("0123456789").rstrip("_")] * v for k, v in losses.items())
        return losses


# --------------------------------------------------------------------------------------
# Re-id
# --------------------------------------------------------------------------------------

class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against smoothed one-hot targets (spec rga §2.2).

    target distribution q = (1 - eps) * onehot(y) + eps / K, loss = mean over the batch of
    -sum_k q_k log softmax(logits)_k.

    ``forward(logits (B, K), labels (B,) int64 in [0, K))`` -> scalar.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"CrossEntropyLabelSmooth: num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= epsilon < 1.0:
            raise ConfigError(f"CrossEntropyLabelSmooth: epsilon must be in [0, 1), got {epsilon}")
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise InputError(f"CrossEntropyLabelSmooth: logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        if labels.shape != logits.shape[:1]:
            raise InputError(f"CrossEntropyLabelSmooth: labels must be ({logits.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InputError(f"CrossEntropyLabelSmooth: labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        log_probs = logits.log_softmax(dim=1)
        nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        return ((1 - self.epsilon) * nll + self.epsilon * uniform).mean()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss with Euclidean distance on unnormalised features (spec rga §2.2).

    For each anchor i: d_ap = max distance to a sample of the same identity, d_an = min distance to
    a sample of another identity; loss = mean_i max(0, d_ap - d_an + margin). The batch must hold
    at least two identities (a PK-sampled batch: P identities x K images).

    ``forward(features (B, D), labels (B,))`` -> scalar.
    """

    def __init__(self, margin: float = 0.3):
        super().__init__()
        if margin < 0:
            raise ConfigError(f"TripletLoss: margin must be >= 0, got {margin}")
        self.margin = margin

    @staticmethod
    def pairwise_distance(features: Tensor) -> Tensor:
        """(B, D) -> (B, B) Euclidean distances; squared distances are clamped at 1e-12 before the
        square root so that the gradient stays finite on the diagonal."""
        squared = features.pow(2).sum(dim=1, keepdim=True)
        d2 = squared + squared.t() - 2 * features @ features.t()
        return d2.clamp(min=1e-12).sqrt()

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        if features.dim() != 2:
            raise InputError(f"TripletLoss: features must be (B, D), got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise InputError(f"TripletLoss: labels must be ({features.shape[0]},), got {tuple(labels.shape)}")
        same = labels[:, None] == labels[None, :]
        if bool(same.all()):
            raise InputError("TripletLoss: the batch holds a single identity; batch-hard mining needs negatives "
                             "(sample P >= 2 identities x K images)")
        dist = self.pairwise_distance(features)
        hardest_positive = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        hardest_negative = dist.masked_fill(same, float("inf")).min(dim=1).values
        return F.relu(hardest_positive - hardest_negative + self.margin).mean()
