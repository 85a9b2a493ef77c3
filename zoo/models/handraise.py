"""Hand-raising detector: Faster R-CNN R50-FPN with a balanced feature pyramid refined by an RPA block.

The static stage of Le et al., "Spatial and Temporal Hand-Raising Recognition from Classroom Videos
Using Locality, Relative Position-Aware Non-Local Networks and Hand Tracking" (VJCS 2023), as far as
the sources describe it (spec rpa §7):

* a two-stage detector (here torchvision's Faster R-CNN with a ResNet-50 + FPN backbone; the shared
  :class:`zoo.models.resnet.ResNet` with frozen BN as the body, torchvision key names);
* Libra R-CNN's balanced feature pyramid (BFP): the five FPN levels are resized to the refine level
  (P4, stride 16), averaged, refined by a non-local block and added back to every level;
* the refine block is :class:`zoo.layers.rpa.MultiheadNonlocal2d` with relative distance
  (the MAPR 2021 "RDA" model) or relative position (the journal model) awareness, and "locality":
  a 3x3 embedding conv (padding 0) instead of 1x1;
* two classes: background and hand-raising.

What is inferred rather than stated (BFP placement, kernel sizes, locality = 3x3 embedding) is listed
in ``configs/rpa.yaml``. No weights or data were published. The temporal stage (tracking to fill
missed detections across frames) is not part of this model.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import FeaturePyramidNetwork, clip_boxes_to_image, nms, roi_align
from torchvision.ops.poolers import _setup_scales
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from zoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from zoo.errors import ConfigError, InputError
from zoo.layers.rpa import MultiheadNonlocal2d
from zoo.models._features import FeaturePoint
from zoo.models._inputs import check_batch, check_finite, weight_dtype
from zoo.models.resnet import FrozenBatchNorm2d, ResNet, freeze_stages, load_imagenet_resnet50
from zoo.registry import register_model


class BalancedFeaturePyramid(nn.Module):
    """Libra R-CNN's balanced feature pyramid with a pluggable refine module.

    gather: levels finer than ``refine_level`` are max-pooled (adaptive) to its size, coarser ones
    upsampled (nearest); the mean of all levels is refined; scatter: the refined map is resized back
    the reverse way and added to each level (a residual).

    Args:
        num_levels: number of pyramid levels it expects.
        refine_level: index of the level whose size the levels are balanced at.
        refine: module (B, C, h, w) -> (B, C, h, w) applied to the balanced map (identity if None).

    forward: list of ``num_levels`` maps (B, C, H_l, W_l) -> list of the same shapes.
    """

    def __init__(self, num_levels: int = 5, refine_level: int = 2, refine: Optional[nn.Module] = None):
        super().__init__()
        if not 0 <= refine_level < num_levels:
            raise ConfigError(f"refine_level must be in [0, {num_levels}), got {refine_level}")
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.refine = refine if refine is not None else nn.Identity()

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != self.num_levels:
            raise InputError(f"BalancedFeaturePyramid expects {self.num_levels} levels, got {len(features)}")
        size = features[self.refine_level].shape[-2:]
        gathered = [F.adaptive_max_pool2d(f, size) if i < self.refine_level else F.interpolate(f, size=size, mode="nearest")
                    for i, f in enumerate(features)]
        balanced = self.refine(sum(gathered) / len(gathered))
        return [f + (F.interpolate(balanced, size=f.shape[-2:], mode="nearest") if i < self.refine_level
                     else F.adaptive_max_pool2d(balanced, f.shape[-2:]))
                for i, f in enumerate(features)]


class ResNetFPNBalancedBackbone(nn.Module):
    """ResNet body -> FPN (P2-P5 + max-pooled P6, ``out_channels``) -> balanced feature pyramid.

    Args:
        refine: the BFP's refine module on (B, out_channels, h, w).
        trainable_layers: 0..5 of conv1, layer1..4 to train.
        frozen_bn: FrozenBatchNorm2d (True) or BatchNorm2d in the body.
        layers, width_div: of the shared ResNet ((3, 4, 6, 3), 1: ResNet-50).
        out_channels: FPN width (256 in the papers).
        in_chans: input channels of the body (3: RGB).

    forward: (B, 3, H, W) normalised images -> OrderedDict ``'0'..'3', 'pool'`` of
    (B, out_channels, H/s, W/s), s = 4, 8, 16, 32, 64 (what torchvision's detection heads expect).
    State-dict keys: ``body.*`` (torchvision ResNet names), ``fpn.*`` (torchvision's FPN), ``bfp.refine.*``.
    """

    def __init__(self, refine: nn.Module, trainable_layers: int = 5, frozen_bn: bool = True,
                 layers: Sequence[int] = (3, 4, 6, 3), width_div: int = 1, out_channels: int = 256,
                 in_chans: int = 3):
        super().__init__()
        self.out_channels = out_channels
        self.body = ResNet(layers=tuple(layers), width_div=width_div,
                           norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d, num_classes=None,
                           in_chans=in_chans)
        stage_channels = [stage[-1].conv3.out_channels for stage in self.body.stages]
        self.fpn = FeaturePyramidNetwork(stage_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.bfp = BalancedFeaturePyramid(num_levels=5, refine_level=2, refine=refine)
        freeze_stages(self.body, trainable_layers)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.body.forward_stem(x)
        stages = OrderedDict()
        for index, layer in enumerate(self.body.stages):
            x = layer(x)
            stages[str(index)] = x
        pyramid = self.fpn(stages)                       # '0', '1', '2', '3', 'pool'
        return OrderedDict(zip(pyramid.keys(), self.bfp(list(pyramid.values()))))


class HandRaiseRCNN(FasterRCNN):
    """Faster R-CNN R50-FPN + BFP whose refine step is an RPA multi-head non-local block.

    Args:
        rpa_mode: ``'relative_distance'`` or ``'relative_position'`` (None: the plain non-local BFP of
            Libra R-CNN).
        rpa_kernel_size, rpa_interpolation: of the refine block (see MultiheadNonlocal2d).
        locality: 3x3 embedding conv (padding 0) in the refine block instead of 1x1.
        num_heads, hidden_channels, use_scale: of the refine block (Libra R-CNN's non-local BFP uses
            d = 256 channels and no scaling).
        num_classes: including background (2: background, hand-raising).
        backbone_layers, backbone_width_div, fpn_channels: a smaller network than R50-FPN (blocks per
            stage, width divisor of the shared ResNet, FPN width; defaults (3, 4, 6, 3), 1, 256).
        anchor_sizes: one anchor size per pyramid level (5; aspect ratios 0.5, 1, 2), for objects
            smaller than torchvision's default (32, 64, 128, 256, 512).
        representation_size: width of the box head's two fully connected layers (torchvision: 1024).
        min_size, max_size: torchvision's resize (shorter side, longer-side cap) before the backbone.
        pretrained_backbone: start the ResNet-50 from torchvision's ImageNet weights (downloads them).
        trainable_backbone_layers: 0..5 of conv1, layer1..4 to train (default 3 with a pretrained
            backbone, else 5, as torchvision).
        frozen_bn: the backbone's BN layers are frozen (the detection standard when starting from
            ImageNet weights); False gives trainable BatchNorm2d, better for training from scratch.
        in_chans: input channels (3: RGB); the detector normalises each with ImageNet's statistics
            (repeated over the channels; their average for one channel) unless ``image_mean`` /
            ``image_std`` are given.
        **detector_kwargs: passed to torchvision's FasterRCNN (rpn_*, box_* thresholds ...).

    Input/output: torchvision's detection API. ``model(images, targets)`` in training mode (images:
    list of (3, H, W) RGB in [0, 1]; targets: dicts with ``boxes`` (n, 4) xyxy pixels and ``labels``
    (n,) int64, 1 = hand-raising) returns the loss dict; in eval mode ``model(images)`` returns per
    image ``{'boxes', 'labels', 'scores'}`` in the input image's pixels. ``get_classifier`` /
    ``reset_classifier(num_classes)``: the box predictor; as a backbone (:mod:`zoo.models._features`)
    the ResNet body's maps of images in [0, 1], normalised as the detector does (not resized).
    """

    def __init__(self, rpa_mode: Optional[str] = "relative_position", rpa_kernel_size=5,
                 rpa_interpolation: str = "slerp", locality: bool = True, num_heads: int = 1,
                 hidden_channels: Optional[int] = None, use_scale: bool = False, num_classes: int = 2,
                 min_size: int = 800, max_size: int = 1333, pretrained_backbone: bool = False,
                 trainable_backbone_layers: Optional[int] = None, frozen_bn: bool = True,
                 backbone_layers: Sequence[int] = (3, 4, 6, 3), backbone_width_div: int = 1, fpn_channels: int = 256,
                 anchor_sizes: Optional[Sequence[int]] = None, representation_size: Optional[int] = None,
                 in_chans: int = 3, **detector_kwargs):
        refine = MultiheadNonlocal2d(
            fpn_channels, hidden_channels=hidden_channels, num_heads=num_heads,
            kernel_size=3 if locality else 1, use_scale=use_scale, rpa_mode=rpa_mode,
            rpa_kernel_size=rpa_kernel_size if rpa_mode else None, rpa_interpolation=rpa_interpolation)
        if trainable_backbone_layers is None:
            trainable_backbone_layers = 3 if pretrained_backbone else 5
        backbone = ResNetFPNBalancedBackbone(refine, trainable_backbone_layers, frozen_bn, backbone_layers,
                                             backbone_width_div, fpn_channels, in_chans)
        if in_chans != 3:
            detector_kwargs.setdefault("image_mean", _per_channel(IMAGENET_MEAN, in_chans))
            detector_kwargs.setdefault("image_std", _per_channel(IMAGENET_STD, in_chans))
        if anchor_sizes is not None:
            if len(anchor_sizes) != 5:
                raise ConfigError(f"anchor_sizes needs one size per pyramid level (5), got {list(anchor_sizes)}")
            detector_kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((int(size),) for size in anchor_sizes),
                                                                      ((0.5, 1.0, 2.0),) * 5)
        if representation_size is not None:
            resolution = 7  # torchvision's MultiScaleRoIAlign output size for the box head
            detector_kwargs["box_head"] = TwoMLPHead(fpn_channels * resolution ** 2, representation_size)
            detector_kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
            num_classes = None  # torchvision takes the class count from the predictor then
        if pretrained_backbone:
            load_imagenet_resnet50(backbone.body)
        super().__init__(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **detector_kwargs)
        self.locality = locality

    @property
    def num_classes(self) -> int:
        return self.roi_heads.box_predictor.cls_score.out_features

    def forward(self, images, targets=None):
        """torchvision's detection forward, after checking the images (:mod:`zoo.models._inputs`): each
        (in_chans, H, W) of the weights' floating dtype (not cast here), large enough that the detector's
        resize keeps the backbone's total stride. No images: no detections (in eval mode).

        A model in bfloat16 / float16 runs it under autocast in that dtype, which gives torchvision's NMS (no
        reduced-precision CPU kernel) its float32 inputs."""
        if isinstance(images, torch.Tensor) and images.dim() != 4:
            raise InputError(f"HandRaiseRCNN takes a list of ({self.backbone.body.in_chans}, H, W) images (or a "
                             f"(B, C, H, W) batch), got a tensor of shape {tuple(images.shape)}")
        images = list(images)
        self._check_images(images)
        if not images:
            if self.training:
                raise InputError("HandRaiseRCNN: a training batch needs at least one image")
            return []
        dtype, device = weight_dtype(self), self.roi_heads.box_predictor.cls_score.weight.device.type
        if dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(device):
            with torch.autocast(device, dtype=dtype):
                return super().forward(images, targets)
        return super().forward(images, targets)

    def _check_images(self, images: Sequence[torch.Tensor]) -> None:
        channels = self.backbone.body.in_chans
        stride = self.backbone.body.feature_points()[-1].reduction
        min_size, max_size = self.transform.min_size[-1], self.transform.max_size
        for image in images:
            check_batch(image, model="HandRaiseRCNN", layout=f"a list of ({channels}, H, W) images", rank=3,
                        channels=channels, channel_dim=0, dtype=weight_dtype(self))
            height, width = image.shape[-2:]
            scale = min(min_size / min(height, width), max_size / max(height, width))  # the detector's resize
            if min(height, width) * scale < stride:
                raise InputError(f"HandRaiseRCNN: a {height}x{width} image is resized to "
                                 f"{round(height * scale)}x{round(width * scale)}, smaller than the backbone's "
                                 f"total stride {stride}; crop it to a less extreme aspect ratio")

    def get_classifier(self) -> nn.Module:
        return self.roi_heads.box_predictor

    def reset_classifier(self, num_classes: int) -> None:
        """A new box predictor (class scores and per-class boxes) for ``num_classes``, background included."""
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes counts the background: an int >= 2, got {num_classes!r}")
        old = self.roi_heads.box_predictor
        self.roi_heads.box_predictor = FastRCNNPredictor(old.cls_score.in_features, num_classes)

    # -- backbone (zoo.models._features): the ResNet body's maps --
    feature_head = ("rpn", "roi_heads", "backbone.fpn", "backbone.bfp")

    def feature_points(self) -> list[FeaturePoint]:
        return [dataclasses.replace(p, module=f"backbone.body.{p.module}") for p in self.backbone.body.feature_points()]

    def forward_intermediates(self, images, indices: Sequence[int]) -> list[torch.Tensor]:
        """A (B, C, H, W) batch in [0, 1] (or a list of same-size (C, H, W) images) -> the body's maps."""
        batch = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
        return self.backbone.body.forward_intermediates(self.transform.normalize(batch), indices)

    # -- export (zoo.export): the same detections without data-dependent shapes --

    def forward_export(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Fixed-size detections of a batch, for torch.export / ONNX: the eval-mode ``model(list(images))``
        of torchvision without shapes that depend on the data.

        images: (B, C, H, W) in [0, 1], one size for the batch. Returns ``boxes`` (B, N, 4) xyxy in input
        pixels, ``scores`` (B, N), ``labels`` (B, N) int64 and ``num_detections`` (B,) int64, with N =
        ``roi_heads.detections_per_img``: the first ``num_detections[b]`` rows of image b are torchvision's
        detections of it in its order, the rest padding (box, score and label 0).

        The same steps as torchvision's transform, RPN, RoI heads and postprocess, batched: filtered
        proposals and detections are masked (score -inf) instead of removed, every (image, level) or
        (image, class) group goes through one NMS with disjoint coordinate offsets (torchvision's
        ``batched_nms`` trick), and the survivors are picked by ``topk``; RoI pooling computes every
        proposal on every pyramid level and keeps its own level's result.
        """
        check_batch(images, model="HandRaiseRCNN.forward_export", layout=f"(B, {self.backbone.body.in_chans}, H, W)",
                    rank=4, channels=self.backbone.body.in_chans, dtype=weight_dtype(self))
        height, width = images.shape[-2:]
        x, resized = self._export_transform(images)
        features = self.backbone(x)
        proposals, proposal_valid = self._export_proposals(x, list(features.values()), resized)
        boxes, scores, labels, valid = self._export_detections(features, proposals, proposal_valid, resized)
        ratio = boxes.new_tensor([width / resized[1], height / resized[0]] * 2)
        keep = valid[..., None]
        return OrderedDict(boxes=torch.where(keep, boxes * ratio, 0.0), scores=torch.where(valid, scores, 0.0),
                           labels=torch.where(valid, labels, 0), num_detections=valid.sum(1))

    def _export_transform(self, images: torch.Tensor):
        """torchvision's GeneralizedRCNNTransform on a batch: normalise, resize (one scale), pad to a multiple of
        32. Returns (batch, resized (h, w))."""
        t = self.transform
        height, width = images.shape[-2:]
        scale = min(t.min_size[-1] / min(height, width), t.max_size / max(height, width))
        x = F.interpolate(t.normalize(images), scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                          align_corners=False)
        resized = tuple(x.shape[-2:])
        stride = t.size_divisible
        padded = [-(-s // stride) * stride for s in resized]
        return F.pad(x, (0, padded[1] - resized[1], 0, padded[0] - resized[0])), resized

    def _export_proposals(self, x: torch.Tensor, features: list, resized):
        """The RPN's proposals (B, P, 4) and their validity (B, P), P = min(post_nms_top_n, candidates)."""
        rpn = self.rpn
        batch = x.shape[0]
        objectness, deltas = rpn.head(features)
        generator = rpn.anchor_generator
        generator.set_cell_anchors(features[0].dtype, features[0].device)
        grid_sizes = [list(f.shape[-2:]) for f in features]
        strides = [[x.shape[-2] // g[0], x.shape[-1] // g[1]] for g in grid_sizes]
        anchors = torch.cat(generator.grid_anchors(grid_sizes, strides))                  # (A, 4), every image
        per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode_single(deltas, anchors.repeat(batch, 1)).view(batch, -1, 4)
        objectness = objectness.reshape(batch, -1)
        top, levels, start = [], [], 0
        for level, count in enumerate(per_level):  # top-n per level, as torchvision
            k = min(rpn.pre_nms_top_n(), count)
            top.append(objectness[:, start:start + count].topk(k, dim=1).indices + start)
            levels += [level] * k
            start += count
        top = torch.cat(top, 1)
        levels = torch.tensor(levels, device=x.device).expand(batch, -1)
        scores = torch.sigmoid(objectness.gather(1, top))
        boxes = clip_boxes_to_image(proposals.gather(1, top[..., None].expand(-1, -1, 4)), resized)
        valid = _large_enough(boxes, rpn.min_size) & (scores >= rpn.score_thresh)
        boxes, _, valid, _ = _nms_top(boxes, scores, valid, levels, len(per_level), rpn.nms_thresh,
                                      rpn.post_nms_top_n())
        return boxes, valid

    def _export_detections(self, features, proposals: torch.Tensor, proposal_valid: torch.Tensor, resized):
        """The RoI heads on (B, P, 4) proposals -> boxes (B, N, 4), scores, labels, valid (B, N)."""
        heads = self.roi_heads
        batch, num_proposals = proposals.shape[:2]
        flat = proposals.reshape(-1, 4)
        pooled = _roi_align_levels(heads.box_roi_pool, features, flat, batch, resized)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        num_classes = class_logits.shape[-1]
        boxes = heads.box_coder.decode_single(box_regression, flat).reshape(batch, num_proposals, num_classes, 4)
        boxes = clip_boxes_to_image(boxes, resized)[:, :, 1:].reshape(batch, -1, 4)     # background dropped
        scores = F.softmax(class_logits, -1).reshape(batch, num_proposals, num_classes)[:, :, 1:].reshape(batch, -1)
        labels = torch.arange(1, num_classes, device=boxes.device).repeat(num_proposals).expand(batch, -1)
        valid = (proposal_valid.repeat_interleave(num_classes - 1, dim=1) & (scores > heads.score_thresh)
                 & _large_enough(boxes, 1e-2))
        boxes, scores, valid, keep = _nms_top(boxes, scores, valid, labels, num_classes, heads.nms_thresh,
                                              heads.detections_per_img)
        return boxes, scores, labels.gather(1, keep), valid

    @torch.no_grad()
    def coco_predictions(self, images: Sequence[torch.Tensor], orig_sizes: torch.Tensor) -> list[dict]:
        """Detections for COCO evaluation, in the format of DETR's PostProcess.

        images: list of (3, h, w) RGB in [0, 1] (possibly resized by the caller); orig_sizes: (B, 2)
        (height, width) of the original images. Returns per image ``{'scores' (n,), 'labels' (n,),
        'boxes' (n, 4) xyxy in original pixels}``; label 1 = hand-raising (its COCO category id).
        """
        check_finite(images, "HandRaiseRCNN")
        detections = self(list(images))
        out = []
        for det, image, (height, width) in zip(detections, images, orig_sizes.tolist()):
            scale = det["boxes"].new_tensor([width / image.shape[-1], height / image.shape[-2]] * 2)
            out.append({"scores": det["scores"], "labels": det["labels"], "boxes": det["boxes"] * scale})
        return out


def _large_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """torchvision's remove_small_boxes as a mask: width and height >= min_size."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def _nms_top(boxes, scores, valid, groups, num_groups: int, iou_threshold: float, top: int):
    """Per image and group (level or class), NMS of the valid boxes; then each image's ``top`` best survivors.

    boxes (B, K, 4), scores / valid / groups (B, K). One NMS over the whole batch: every (image, group) is
    shifted to its own coordinate range (torchvision's ``batched_nms`` trick), invalid boxes score -inf (they
    sort last and so never suppress a valid one). Returns boxes (B, T, 4), scores (B, T), valid (B, T) and
    the picked indices (B, T) into K, best first, T = min(top, K)."""
    batch, count = scores.shape
    masked = torch.where(valid, scores, float("-inf"))
    image = torch.arange(batch, device=boxes.device)[:, None]
    offsets = ((image * num_groups + groups) * (boxes.max() + 1)).to(boxes.dtype)
    # float32: torchvision's CPU NMS has no reduced-precision kernel
    keep = nms((boxes + offsets[..., None]).reshape(-1, 4).float(), masked.reshape(-1).float(), iou_threshold)
    kept = torch.zeros(batch * count, dtype=torch.bool, device=boxes.device).index_fill(0, keep, True)
    ranked = torch.where(kept.view(batch, count) & valid, scores, float("-inf"))
    best, picked = ranked.topk(min(top, count), dim=1)
    return boxes.gather(1, picked[..., None].expand(-1, -1, 4)), best, torch.isfinite(best), picked


def _roi_align_levels(pooler, features: "OrderedDict[str, torch.Tensor]", rois: torch.Tensor, batch: int,
                      resized) -> torch.Tensor:
    """torchvision's MultiScaleRoIAlign on (B*P, 4) boxes (P per image, image-major) without data-dependent
    shapes: every box pooled from every level, each keeping its own level's result."""
    maps = [features[name] for name in pooler.featmap_names]
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(maps, [tuple(resized)], pooler.canonical_scale,
                                                         pooler.canonical_level)
    image = torch.arange(batch, device=rois.device, dtype=rois.dtype).repeat_interleave(rois.shape[0] // batch)
    indexed = torch.cat([image[:, None], rois], 1)
    levels = pooler.map_levels([rois])
    result = None
    for level, (feature, scale) in enumerate(zip(maps, pooler.scales)):
        pooled = roi_align(feature.float(), indexed.float(), pooler.output_size, spatial_scale=scale,  # as NMS
                           sampling_ratio=pooler.sampling_ratio).to(feature.dtype)
        result = pooled if result is None else torch.where((levels == level)[:, None, None, None], pooled, result)
    return result


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    """Per-RGB statistics for ``channels`` inputs: their mean for one channel, else repeated (timm's rule for weights)."""
    if channels == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(channels)]


@register_model
def handraise_rcnn_r50_fpn_rpa_distance(**kwargs) -> HandRaiseRCNN:
    """Hand-raising Faster R-CNN R50-FPN, balanced pyramid refined by a locality + relative-distance non-local block."""
    kwargs.setdefault("rpa_mode", "relative_distance")
    return HandRaiseRCNN(**kwargs)


@register_model
def handraise_rcnn_r50_fpn_rpa_position(**kwargs) -> HandRaiseRCNN:
    """Hand-raising Faster R-CNN R50-FPN, balanced pyramid refined by a locality + relative-position non-local block."""
    kwargs.setdefault("rpa_mode", "relative_position")
    return HandRaiseRCNN(**kwargs)


#: RelZoo-mini (issue 10): the journal model's layers, narrower and shallower, for small images of small hands.
_MINI = dict(rpa_mode="relative_position", rpa_kernel_size=5, rpa_interpolation="slerp", locality=True,
             num_heads=1, hidden_channels=32, num_classes=2, min_size=160, max_size=288, frozen_bn=False,
             trainable_backbone_layers=5, backbone_layers=[1, 1, 1, 1], backbone_width_div=8, fpn_channels=64,
             anchor_sizes=[16, 32, 64, 128, 256], representation_size=128, rpn_pre_nms_top_n_train=1000,
             rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
             box_batch_size_per_image=64)


@register_model
def handraise_rpa_mini(**kwargs) -> HandRaiseRCNN:
    """RelZoo-mini: the relative-position hand-raising detector on a 1-1-1-1 block ResNet at 1/8 width,
    64-channel FPN + RPA-refined balanced pyramid, anchors 16-256, a 128-wide box head, images resized to
    a shorter side of 160."""
    return HandRaiseRCNN(**{**_MINI, **kwargs})
