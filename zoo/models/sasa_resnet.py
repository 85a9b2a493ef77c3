"""SASA ResNets (spec ``shared/specs/sasa.md`` §8): the paper's ImageNet layout and the public CIFAR one.

ImageNet (spec §8.1), on the shared :class:`zoo.models.resnet.ResNet`, torchvision key names:

* ``sasa_resnet{26,38,50}``: every 3x3 conv replaced by :class:`SASAttention2d` (k=7, 8 heads,
  strided blocks: attention then a 2x2 average pool), the spatially-aware attention stem
  (attention inside 4x4 tiles, BN, ReLU, 4x4 max pool) stored as ``stem``.
* ``sasa_resnet{26,38,50}_convstem``: the same with the usual 7x7/2 conv + 3x3/2 max-pool stem.

CIFAR (spec §8.2), leaderj1001's ``model.py`` layout with its key names (``init``, ``layerL.B.conv1.0``,
``conv2.0`` = :class:`AttentionConv`, ``shortcut``, ``dense``), so its checkpoints load through the
``sasa-leader`` map: ``sasa_resnet{26,38,50}_cifar``. Its block differs from the shared ResNet's
(average pool after conv3 + BN in the original), hence its own small module here.

No official weights exist for any of them (spec §0, §9).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.convert import register_hook
from zoo.errors import ConfigError, InputError
from zoo.layers.sasa import AttentionConv, AttentionStem, SASAttention2d, SASAttentionStem
from zoo.models._features import FeaturePoint
from zoo.models._head import PooledClassifier
from zoo.models._inputs import check_batch, weight_dtype
from zoo.models.resnet import ResNet
from zoo.registry import register_model

_LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
_STEMS = ("attention", "conv")


# ------------------------------------------------------------------------------------------------
# ImageNet layout (paper)
# ------------------------------------------------------------------------------------------------

def attention_stem(out_channels: int = 64, heads: int = 4, mixtures: int = 4, block: int = 4,
                   in_chans: int = 3) -> nn.Sequential:
    """The paper's stem (spec §2): spatially-aware attention in ``block`` x ``block`` tiles, BN, ReLU,
    ``block`` x ``block`` max pool. (B, in_chans, H, W) -> (B, out_channels, ceil(H/block), ceil(W/block))."""
    return nn.Sequential(
        SASAttentionStem(in_chans, out_channels, block=block, heads=heads, mixtures=mixtures),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(block, block, ceil_mode=True),
    )


def sasa_resnet(depth: int, stem: str = "attention", num_classes: Optional[int] = 1000, kernel_size: int = 7,
                heads: int = 8, padding_mode: str = "mask", stem_heads: int = 4, stem_mixtures: int = 4,
                **resnet_kwargs: Any) -> ResNet:
    """A SASA ResNet-26/38/50 (spec §8.1).

    Args:
        depth: 26, 38 or 50 (blocks per stage (1,2,4,1), (2,3,5,2), (3,4,6,3)).
        stem: ``'attention'`` (full attention, the paper's spatially-aware stem) or ``'conv'``.
        num_classes: classifier size; None for a feature extractor (B, 2048, H/32, W/32).
        kernel_size, heads, padding_mode: of every :class:`SASAttention2d`.
        stem_heads, stem_mixtures: of the attention stem (spec §2; mixtures are not stated in the paper).
        resnet_kwargs: passed to :class:`zoo.models.resnet.ResNet` (e.g. ``zero_init_residual``,
            ``in_chans``, ``global_pool``).
    """
    if depth not in _LAYERS:
        raise ConfigError(f"depth must be one of {sorted(_LAYERS)}, got {depth}")
    if stem not in _STEMS:
        raise ConfigError(f"stem must be one of {_STEMS}, got {stem!r}")

    def spatial(stage: int, block: int, width: int, stride: int) -> nn.Module:
        return SASAttention2d(width, width, kernel_size, stride, heads, padding_mode)

    # the stem feeds layer1, whose input width is the ResNet's stem width 64 / width_div
    stem_width = 64 // int(resnet_kwargs.get("width_div", 1))
    stem_module = (attention_stem(stem_width, stem_heads, stem_mixtures, in_chans=int(resnet_kwargs.get("in_chans", 3)))
                   if stem == "attention" else None)
    return ResNet(_LAYERS[depth], spatial_layer=spatial, stem=stem_module, num_classes=num_classes, **resnet_kwargs)


@register_model
def sasa_resnet26(**kwargs) -> nn.Module:
    """SASA ResNet-26, full attention (attention stem)."""
    return sasa_resnet(26, **{"stem": "attention", **kwargs})


@register_model
def sasa_resnet38(**kwargs) -> nn.Module:
    """SASA ResNet-38, full attention (attention stem)."""
    return sasa_resnet(38, **{"stem": "attention", **kwargs})


@register_model
def sasa_resnet50(**kwargs) -> nn.Module:
    """SASA ResNet-50, full attention (attention stem)."""
    return sasa_resnet(50, **{"stem": "attention", **kwargs})


@register_model
def sasa_resnet_mini(**kwargs) -> nn.Module:
    """RelZoo-mini: SASA ResNet-26 (attention stem) at 1/8 width, 4 heads, k=5, for 64x64 shapes-cls."""
    return sasa_resnet(26, **{"stem": "attention", "width_div": 8, "heads": 4, "kernel_size": 5,
                              "stem_heads": 2, "num_classes": 10, **kwargs})


@register_model
def sasa_resnet26_convstem(**kwargs) -> nn.Module:
    """SASA ResNet-26 with the convolutional stem."""
    return sasa_resnet(26, **{"stem": "conv", **kwargs})


@register_model
def sasa_resnet38_convstem(**kwargs) -> nn.Module:
    """SASA ResNet-38 with the convolutional stem."""
    return sasa_resnet(38, **{"stem": "conv", **kwargs})


@register_model
def sasa_resnet50_convstem(**kwargs) -> nn.Module:
    """SASA ResNet-50 with the convolutional stem."""
    return sasa_resnet(50, **{"stem": "conv", **kwargs})


# ------------------------------------------------------------------------------------------------
# CIFAR layout (leaderj1001 model.py)
# ------------------------------------------------------------------------------------------------

def _bn_act(conv: nn.Module, channels: int, relu: bool = True) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), *([nn.ReLU()] if relu else []))


class LeaderBottleneck(nn.Module):
    """leaderj1001 ``Bottleneck`` (spec §8.2), keys ``conv1.{0,1}``, ``conv2.{0,1}``, ``conv3.{0,1}``, ``shortcut.{0,1}``.

    conv1 = 1x1 conv, BN, ReLU; conv2 = AttentionConv(w, w, 7, padding 3, groups 8), BN, ReLU;
    conv3 = 1x1 conv to 4w, BN; shortcut = strided 1x1 conv + BN when the shape changes; ReLU(sum).
    ``width`` (default ``out_channels``): channels of conv1/conv2 (the original's
    ``int(out_channels * base_width / 64) * groups``). Strided blocks (stride 2) pool with a 2x2 average pool:

    * bug_compatible=False (default): right after the attention, as the paper says (spec §1);
    * bug_compatible=True: after conv3 + BN, as the original (and the per-channel attention softmax).

    Shapes: (B, in_channels, H, W) -> (B, 4 * out_channels, H / stride, W / stride).
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 7, groups: int = 8,
                 bug_compatible: bool = False, width: Optional[int] = None):
        super().__init__()
        width, out = width or out_channels, out_channels * self.expansion
        self.stride, self.bug_compatible = stride, bug_compatible
        self.conv1 = _bn_act(nn.Conv2d(in_channels, width, 1, bias=False), width)
        self.conv2 = _bn_act(AttentionConv(width, width, kernel_size, padding=(kernel_size - 1) // 2, groups=groups,
                                           bug_compatible=bug_compatible), width)
        self.conv3 = _bn_act(nn.Conv2d(width, out, 1, bias=False), out, relu=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride < 2:
            return x
        # the original floors; the corrected block rounds up like the strided 1x1 shortcut does
        return F.avg_pool2d(x, self.stride, ceil_mode=not self.bug_compatible)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        attention, bn, relu = self.conv2
        if self.bug_compatible:
            out = self._pool(self.conv3(relu(bn(attention(out)))))
        else:
            out = self.conv3(relu(bn(self._pool(attention(out)))))
        return F.relu(out + self.shortcut(x))


class SASACifarResNet(PooledClassifier, nn.Module):
    """leaderj1001 ``Model`` (spec §8.2): CIFAR stem, four stages of :class:`LeaderBottleneck`, ``dense`` head.

    Args:
        layers: blocks per stage, (1, 2, 4, 1) / (2, 3, 5, 2) / (3, 4, 6, 3) for ResNet-26/38/50.
        num_classes: classes of ``dense`` (10 for CIFAR-10).
        stem: ``'conv'`` (3x3/1 conv, BN, ReLU; the original's stem=False) or ``'attention'``
            (AttentionStem(3, 64, k=4, padding 2, m=4), BN, ReLU; stem=True).
        bug_compatible: the original's defects (per-channel softmax, pool after conv3 + BN, fixed
            4x4 average pool before ``dense``, which only fits 32x32 inputs). Needed for its checkpoints;
            the ``sasa-leader`` converter records it. Default: corrected behaviour, global average pool.
        in_chans: input channels (3: RGB).
        global_pool: the pooling before ``dense`` (``'avg'``; ``'max'``, ``'avgmax'``, or ``''`` with
            num_classes 0); with ``bug_compatible`` only ``'avg'`` (the original's fixed 4x4 pool).

    Shapes: (B, in_chans, H, W) -> (B, num_classes) (0: the pooled features (B, 4 * 512)). The stages
    have strides 1, 2, 2, 2.
    """

    def __init__(self, layers: Sequence[int] = (1, 2, 4, 1), num_classes: int = 10, stem: str = "conv",
                 bug_compatible: bool = False, in_chans: int = 3, global_pool: str = "avg"):
        super().__init__()
        if stem not in _STEMS:
            raise ConfigError(f"stem must be one of {_STEMS}, got {stem!r}")
        self.bug_compatible, self.in_chans = bug_compatible, in_chans
        if stem == "attention":
            first = AttentionStem(in_chans, 64, kernel_size=4, stride=1, padding=2, groups=1, m=4,
                                  bug_compatible=bug_compatible)
        else:
            first = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.init = _bn_act(first, 64)
        in_channels = 64
        self._feature_points = [FeaturePoint("init", 64, 1)]
        for stage, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2)), start=1):
            width = 64 * 2 ** (stage - 1)
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(LeaderBottleneck(in_channels, width, stride if b == 0 else 1,
                                                     bug_compatible=bug_compatible))
                in_channels = width * LeaderBottleneck.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*stage_blocks))
            self._feature_points.append(FeaturePoint(f"layer{stage}", in_channels, 2 ** (stage - 1)))
        self.num_features = in_channels
        self.reset_classifier(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> layer4's map (B, 2048, H / 8, W / 8)."""
        return self.forward_intermediates(x, (4,))[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """layer4's map -> pooled features (``pre_logits``) or logits (B, num_classes)."""
        if self.bug_compatible:
            if x.shape[-2:] != (4, 4):
                raise InputError(f"bug_compatible=True keeps the original's fixed 4x4 average pool, which needs "
                                 f"32x32 inputs (a 4x4 final map); got a final map of {tuple(x.shape[-2:])}")
            x = torch.flatten(F.avg_pool2d(x, 4), 1)
        else:
            x = self.global_pool(x)
        return x if pre_logits else self.dense(x)

    classifier_name = "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if self.bug_compatible and global_pool not in (None, "avg"):
            raise ConfigError(f"bug_compatible=True keeps the original's 4x4 average pool; global_pool={global_pool!r} "
                              f"needs bug_compatible=False")
        super().reset_classifier(num_classes, global_pool)

    # -- backbone (zoo.models._features): the stem's map and each stage's --
    feature_head = ("global_pool", "dense")

    def feature_points(self) -> list[FeaturePoint]:
        return list(self._feature_points)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        check_batch(x, model=type(self).__name__, layout=f"(B, {self.in_chans}, H, W)", rank=4, channels=self.in_chans,
                    dtype=weight_dtype(self), min_size=self._feature_points[-1].reduction)
        maps = [self.init(x)]
        for stage in range(1, max(indices) + 1):
            maps.append(getattr(self, f"layer{stage}")(maps[-1]))
        return [maps[i] for i in indices]


@register_model
def sasa_resnet26_cifar(**kwargs) -> SASACifarResNet:
    """leaderj1001 CIFAR ResNet-26 (AttentionConv bottlenecks)."""
    return SASACifarResNet(_LAYERS[26], **kwargs)


@register_model
def sasa_resnet38_cifar(**kwargs) -> SASACifarResNet:
    """leaderj1001 CIFAR ResNet-38 (AttentionConv bottlenecks)."""
    return SASACifarResNet(_LAYERS[38], **kwargs)


@register_model
def sasa_resnet50_cifar(**kwargs) -> SASACifarResNet:
    """leaderj1001 CIFAR ResNet-50 (AttentionConv bottlenecks)."""
    return SASACifarResNet(_LAYERS[50], **kwargs)


@register_hook
def leader_checkpoint_kwargs(checkpoint: Any) -> dict:
    """``model_kwargs`` hook of ``convert/sasa-leader.yaml``: constructor kwargs read off a leaderj1001 checkpoint.

    Its weights were trained with the original's per-channel softmax, so ``bug_compatible=True``;
    the stem and the class count follow from the keys.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else {}
    if not isinstance(state, Mapping):
        return {"bug_compatible": True}
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    kwargs: dict = {"bug_compatible": True, "stem": "attention" if "init.0.emb_a" in state else "conv"}
    if "dense.weight" in state:
        kwargs["num_classes"] = int(state["dense.weight"].shape[0])
    return kwargs


@register_hook
def leader_checkpoint_model(checkpoint: Any) -> Optional[str]:
    """``model_name`` hook of ``convert/sasa-leader.yaml``: ``arch`` (main.py's ``--model_name``, 'ResNet26' /
    'ResNet38' / 'ResNet50') as the registered CIFAR model, or None."""
    arch = checkpoint.get("arch") if isinstance(checkpoint, Mapping) else None
    depth = str(arch)[len("ResNet"):] if isinstance(arch, str) and arch.startswith("ResNet") else ""
    return f"sasa_resnet{depth}_cifar" if depth.isdigit() and int(depth) in _LAYERS else None
