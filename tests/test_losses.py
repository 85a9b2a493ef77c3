"""zoo.losses: DETR matcher / set criterion, box utils, label-smoothing CE, batch-hard triplet.

Every expected value is computed by hand in the test (comments show the arithmetic).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.losses import (CrossEntropyLabelSmooth, HungarianMatcher, SetCriterion, TripletLoss, box_cxcywh_to_xyxy,
                        box_xyxy_to_cxcywh, generalized_box_iou)


# ------------------------------------------------------------------------------------------
# boxes


def test_box_conversions_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.1, 0.1]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.05, 0.85, 0.15, 0.95]]))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)


def test_giou_identical_disjoint_and_overlapping():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])    # IoU 0, hull 3 x 1, union 2 -> 0 - (3 - 2) / 3
    c = torch.tensor([[0.5, 0.0, 1.5, 1.0]])    # inter 0.5, union 1.5, hull 1.5 -> 1/3
    assert torch.allclose(generalized_box_iou(a, a), torch.ones(1, 1))
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[-1 / 3]]))
    assert torch.allclose(generalized_box_iou(a, c), torch.tensor([[1 / 3]]))
    assert generalized_box_iou(torch.cat([a, b, c]), torch.cat([a, b])).shape == (3, 2)


def test_giou_rejects_bad_boxes():
    with pytest.raises(ValueError, match="x1 < x0"):
        generalized_box_iou(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        generalized_box_iou(torch.zeros(3), torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------
# Hungarian matcher


def _outputs(logits, boxes):
    return {"pred_logits": torch.tensor(logits, dtype=torch.float32)[None],
            "pred_boxes": torch.tensor(boxes, dtype=torch.float32)[None]}


def test_matcher_picks_the_obvious_assignment():
    # query 0 predicts target 1 exactly (class 1), query 1 predicts target 0 exactly (class 0)
    box_a, box_b = [0.25, 0.25, 0.2, 0.2], [0.75, 0.7, 0.3, 0.2]
    outputs = _outputs([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]], [box_b, box_a])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([box_a, box_b])}]
    (queries, gts), = HungarianMatcher()(outputs, targets)
    assert queries.tolist() == [0, 1] and gts.tolist() == [1, 0]
    assert queries.dtype == torch.int64


def test_matcher_more_queries_than_targets_and_empty_image():
    target_box = [0.5, 0.5, 0.2, 0.2]
    outputs = {"pred_logits": torch.zeros(2, 3, 3),
               "pred_boxes": torch.tensor([[[0.1, 0.1, 0.1, 0.1], target_box, [0.9, 0.9, 0.1, 0.1]]] * 2)}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([target_box])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    first, second = HungarianMatcher()(outputs, targets)
    assert first[0].tolist() == [1] and first[1].tolist() == [0]
    assert second[0].numel() == 0 and second[1].numel() == 0


def test_matcher_checks_targets():
    outputs = {"pred_logits": torch.zeros(2, 3, 3), "pred_boxes": torch.rand(2, 3, 4)}
    with pytest.raises(ValueError, match="2 images"):
        HungarianMatcher()(outputs, [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}])


# ------------------------------------------------------------------------------------------
# set criterion


def _set_case():
    # C = 2 real classes (logits have 3 entries, index 2 = no object); one target, label 0
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]], requires_grad=True)
    return logits, boxes, [target]


def test_set_criterion_by_hand():
    logits, boxes, targets = _set_case()
    losses = SetCriterion(num_classes=2, aux_loss=False)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # query 0 is matched (label 0, weight 1); query 1 -> no object (weight eos 0.1); weighted mean
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = -math.log(1 / 3)
    expected_ce = (1.0 * ce0 + 0.1 * ce1) / 1.1
    # L1: |0.6 - 0.5| = 0.1 over 1 box. GIoU: pred xyxy [0.5, 0.4, 0.7, 0.6], target [0.4, 0.4, 0.6, 0.6]:
    # intersection 0.1 x 0.2 = 0.02, union 0.06, IoU 1/3, hull 0.3 x 0.2 = 0.06 = union -> GIoU 1/3
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(expected_ce + 5 * 0.1 + 2 * 2 / 3, rel=1e-5)


def test_set_criterion_aux_outputs_and_gradients():
    logits, boxes, targets = _set_case()
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}]}
    criterion = SetCriterion(num_classes=2)
    losses = criterion(outputs, targets)
    assert {"loss_ce_0", "loss_bbox_0", "loss_giou_0"} <= set(losses)
    single = SetCriterion(num_classes=2, aux_loss=False)(outputs, targets)["loss"]
    assert losses["loss"].item() == pytest.approx(2 * single.item(), rel=1e-6)
    losses["loss"].backward()
    assert logits.grad is not None and boxes.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert boxes.grad[0, 0].abs().sum() > 0          # the matched query's box gets a gradient
    assert boxes.grad[0, 1].abs().sum() == 0         # the unmatched one only a class loss


def test_set_criterion_perfect_prediction_and_empty_targets():
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}
    logits = torch.tensor([[[-20.0, 20.0, -20.0], [-20.0, -20.0, 20.0]]])
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.1, 0.1]]])
    losses = SetCriterion(num_classes=2, aux_loss=False)({"pred_logits": logits, "pred_boxes": boxes}, [target])
    assert losses["loss"].item() == pytest.approx(0.0, abs=1e-6)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = SetCriterion(num_classes=2, aux_loss=False)({"pred_logits": logits, "pred_boxes": boxes}, [empty])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert torch.isfinite(losses["loss"])


def test_set_criterion_checks_labels_and_shapes():
    logits, boxes, _ = _set_case()
    bad = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]  # 2 = no-object index
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        SetCriterion(num_classes=2)({"pred_logits": logits, "pred_boxes": boxes}, bad)
    with pytest.raises(ValueError, match="pred_logits"):
        SetCriterion(num_classes=5)({"pred_logits": logits, "pred_boxes": boxes}, _set_case()[2])


# ------------------------------------------------------------------------------------------
# re-id losses


def test_label_smoothing_value_by_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 3, 1])
    eps, k = 0.1, 4
    log_p = logits.detach().log_softmax(1)
    # q = (1 - eps) onehot + eps / K;  loss = mean_i -sum_k q_k log p_ik
    expected = sum(-(1 - eps) * log_p[i, y] - eps / k * log_p[i].sum() for i, y in enumerate(labels.tolist())) / 3
    loss = CrossEntropyLabelSmooth(4, epsilon=eps)(logits, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=eps).item(), rel=1e-6)
    assert CrossEntropyLabelSmooth(4, epsilon=0.0)(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_label_smoothing_checks():
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        CrossEntropyLabelSmooth(4)(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        CrossEntropyLabelSmooth(4)(torch.zeros(2, 4), torch.tensor([0, 4]))


def test_triplet_batch_hard_by_hand():
    # identities [0, 0, 1, 1] at positions 0, 1, 3, 5 on a line (Euclidean distance = |x - y|):
    # anchor 0: d_ap 1, d_an 3 -> max(0, 1 - 3 + 0.3) = 0
    # anchor 1: d_ap 1, d_an 2 -> 0;  anchor 2 (x=3): d_ap 2, d_an 2 -> 0.3;  anchor 3: d_ap 2, d_an 4 -> 0
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [5.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = TripletLoss(margin=0.3)(features, labels)
    assert loss.item() == pytest.approx(0.3 / 4, abs=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_triplet_no_normalisation_and_duplicates():
    # scaling the features scales the distances (no L2 normalisation): 2x -> anchor 2: 4 - 4 + 0.3
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [6.0, 0.0], [10.0, 0.0]])
    assert TripletLoss(0.3)(features, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.3 / 4, abs=1e-5)
    # identical features: distance 0 everywhere, loss = margin, gradient finite (clamped sqrt)
    same = torch.ones(4, 3, requires_grad=True)
    loss = TripletLoss(0.3)(same, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(0.3, abs=1e-4)
    loss.backward()
    assert torch.isfinite(same.grad).all()


def test_triplet_needs_two_identities():
    with pytest.raises(ValueError, match="single identity"):
        TripletLoss()(torch.randn(4, 8), torch.zeros(4, dtype=torch.int64))
