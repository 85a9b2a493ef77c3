"""RGA-S / RGA-C / RGA-SC ResNet-50 for person re-identification (spec ``shared/specs/rga.md`` §2-§4).

Layout of the original ``ResNet50_RGA_Model`` (state_dict keys identical, so its training
checkpoints convert without renames):

    backbone.{conv1,bn1,layer1..4}   ResNet-50, last stride 1 (the shared zoo ResNet)
    backbone.rga_att1..4             one RGA_Module after each whole stage (layerK -> rga_attK -> ...)
    feat_bn                          BatchNorm1d "BN-neck", bias frozen at 0
    cls                              Linear(2048, num_classes, bias=False)

Forward: ``feat_ = avgpool(backbone(x))``, ``feat = feat_bn(feat_)``, ``logits = cls(feat)``.
Training mode returns ``(feat_, feat, logits)``; eval mode returns the test feature chosen by
``test_feature`` (``'feat_'``, before the BN-neck, by default; ``'feat'`` after it). timm's
classifier API: ``forward_features`` is the backbone's map, ``forward_head`` pools, applies the
BN-neck (``pre_logits``: returns ``feat``) and ``cls``.

The RGA modules are sized for one input size (``height`` x ``width``, default 256 x 128); the
network only runs at that size, as the original.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from zoo.convert import register_hook
from zoo.errors import ArgumentError, ConfigError, ConversionError, InputError
from zoo.layers.rga import RGA_Module
from zoo.models._features import FeaturePoint
from zoo.models._head import GlobalPool, classifier_layer
from zoo.models.resnet import ResNet, load_imagenet_resnet50
from zoo.registry import register_model

__all__ = ["RGABackbone", "RGAResNet50", "rga_sc_resnet50", "rga_sc_mini", "rga_s_resnet50", "rga_c_resnet50"]

# Total stride after stage 1..4 with last stride 1 (stem /4, layer2 /2, layer3 /2, layer4 /1).
_STAGE_STRIDES = (4, 8, 16, 16)


class RGABackbone(ResNet):
    """ResNet-50 (last stride 1) with an :class:`RGA_Module` after each stage (spec §2.1).

    Args:
        height, width: the input size the modules are built for; multiples of 16.
        use_spatial, use_channel: which branches the modules have (RGA-SC: both).
        cha_ratio, spa_ratio, down_ratio: :class:`RGA_Module` ratios (the original uses 8, 8, 8).
        width_div: channel-width divisor of the ResNet (1 = ResNet-50; >1 only for small test models).
        backend: of every :class:`RGA_Module`: ``"auto"`` (default, fast low-rank relation convolutions)
            or ``"reference"`` (the direct original form).
        layers: Bottleneck blocks per stage ((3, 4, 6, 3) = ResNet-50; fewer only for small models
            such as ``rga_sc_mini``).
        in_chans: input channels (3: RGB).

    Input ``[B, in_chans, height, width]`` -> ``[B, 2048 / width_div, height / 16, width / 16]``.
    """

    def __init__(self, height: int = 256, width: int = 128, use_spatial: bool = True, use_channel: bool = True,
                 cha_ratio: int = 8, spa_ratio: int = 8, down_ratio: int = 8, width_div: int = 1,
                 backend: str = "auto", layers: Sequence[int] = (3, 4, 6, 3), in_chans: int = 3) -> None:
        if height % 16 or width % 16 or height <= 0 or width <= 0:
            # The original sizes the modules with (h // s) * (w // s) per stage; only multiples
            # of 16 make that equal to the real feature-map sizes.
            raise ConfigError(f"RGA ResNet-50 needs height and width that are positive multiples of 16, "
                              f"got {height}x{width}")
        super().__init__(layers=tuple(layers), width_div=width_div, last_stride=1, num_classes=None, in_chans=in_chans)
        self.height, self.width, self.width_div, self.layers = height, width, width_div, tuple(layers)
        # Registered after the ResNet's layers, so the keys follow backbone.layer4.* (spec §2.4),
        # and not touched by the ResNet's init: the modules keep PyTorch's default init (spec §3).
        for stage, (layer, stride) in enumerate(zip(self.stages, _STAGE_STRIDES), start=1):
            channels = layer[-1].conv3.out_channels
            positions = (height // stride) * (width // stride)
            self.add_module(f"rga_att{stage}", RGA_Module(
                channels, positions, use_spatial=use_spatial, use_channel=use_channel,
                cha_ratio=cha_ratio, spa_ratio=spa_ratio, down_ratio=down_ratio, backend=backend))

    def after_stage(self, stage: int, x: Tensor) -> Tensor:
        return getattr(self, f"rga_att{stage}")(x)

    def stage_output_name(self, stage: int) -> str:
        return f"rga_att{stage}"

    def check_input(self, x: Tensor) -> None:
        super().check_input(x)
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise InputError(f"this RGA model was built for {self.height}x{self.width} inputs, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; build it with height=..., width=... for another size")


class RGAResNet50(nn.Module):
    """RGA ResNet-50 with the BN-neck head of the original (spec §2.2).

    Args:
        num_classes: training identities (767 CUHK03 new protocol, 751 Market-1501); 0: no ``cls``.
        height, width: input size the attention modules are built for (default 256 x 128).
        use_spatial, use_channel: RGA-S, RGA-C, or both (RGA-SC).
        test_feature: what eval mode returns: ``'feat_'`` (pooled, before the BN-neck; default,
            the better of the two in users' logs) or ``'feat'`` (after the BN-neck).
        dropout: dropout on ``feat`` before the classifier (training only; the shipped script uses 0).
        cha_ratio, spa_ratio, down_ratio, width_div, backend, layers: see :class:`RGABackbone`.
        pretrained_backbone: False; True for torchvision's ImageNet ResNet-50 (2017,
            ``resnet50-19c8e357.pth``); or a weights source (path, URL, ``hf://``) of a torchvision
            ResNet-50 state dict, old (no ``num_batches_tracked``) or new. The RGA modules and
            the head keep their initialisation.
        legacy_init: initialise the RGA modules' BatchNorm weights from U(0, 1) as torch 0.4.0 did
            when the original was trained (default: today's constant 1). Irrelevant for inference.
        in_chans: input channels (3: RGB).
        global_pool: the pooling of the backbone's map (``'avg'``, the original's; ``'max'``, ``'avgmax'``).

    Input ``[B, in_chans, height, width]`` (ImageNet-normalised RGB). Eval: ``[B, 2048]``; training:
    ``(feat_ [B, 2048], feat [B, 2048], logits [B, num_classes])``.
    """

    def __init__(self, num_classes: int = 767, height: int = 256, width: int = 128, use_spatial: bool = True,
                 use_channel: bool = True, test_feature: str = "feat_", dropout: float = 0.0,
                 cha_ratio: int = 8, spa_ratio: int = 8, down_ratio: int = 8, width_div: int = 1,
                 backend: str = "auto", pretrained_backbone: Union[bool, str] = False,
                 legacy_init: bool = False, layers: Sequence[int] = (3, 4, 6, 3), in_chans: int = 3,
                 global_pool: str = "avg") -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative int (767 CUHK03, 751 Market-1501; 0: no "
                              f"classifier), got {num_classes!r}")
        if test_feature not in ("feat_", "feat"):
            raise ConfigError(f"test_feature must be 'feat_' (before the BN-neck) or 'feat' (after it), got {test_feature!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.test_feature = test_feature
        self.backbone = RGABackbone(height, width, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio,
                                    width_div, backend, layers, in_chans)
        num_feat = self.backbone.out_channels
        if not global_pool:
            raise ConfigError("global_pool='' is not possible for re-id: the BN-neck takes pooled features")
        self.global_pool = GlobalPool(global_pool)
        self.feat_bn = nn.BatchNorm1d(num_feat)
        nn.init.ones_(self.feat_bn.weight)
        nn.init.zeros_(self.feat_bn.bias)
        self.feat_bn.bias.requires_grad_(False)  # BN-neck: the shift stays 0 (excluded from training)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_classifier(num_classes)
        if legacy_init:
            # torch <= 1.1 drew BatchNorm weights from U(0, 1); the original's RGA modules were
            # trained from that (spec §3). Only matters for reproducing its training.
            for name, module in self.backbone.named_modules():
                if name.startswith("rga_att") and isinstance(module, nn.BatchNorm2d):
                    nn.init.uniform_(module.weight, 0.0, 1.0)
        if pretrained_backbone:
            self.load_imagenet_backbone(None if pretrained_backbone is True else str(pretrained_backbone))

    @property
    def num_features(self) -> int:
        return self.feat_bn.num_features

    def load_imagenet_backbone(self, source: Optional[str] = None, sha256: Optional[str] = None) -> None:
        """Copy a torchvision ResNet-50 state dict into ``backbone.conv1/bn1/layer1..4`` (spec §3.1).

        ``source`` defaults to torchvision's 2017 file; every backbone key but the RGA modules'
        must be filled (see :func:`zoo.models.resnet.load_imagenet_resnet50`).
        """
        load_imagenet_resnet50(self.backbone, source=source, sha256=sha256, allow_missing=("rga_att",))

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> the backbone's map ``[B, 2048, H / 16, W / 16]``."""
        return self.backbone(x)

    def forward_embeddings(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` -> ``(feat_, feat)``, both ``[B, 2048]`` (before / after the BN-neck)."""
        feat_ = self.global_pool(self.forward_features(x))  # global average pool over the whole map
        return feat_, self.feat_bn(feat_)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The backbone's map -> ``feat`` (after the BN-neck, ``pre_logits``) or the identity logits."""
        feat = self.feat_bn(self.global_pool(x))
        return feat if pre_logits else self.cls(self.dropout(feat))

    def forward(self, x: Tensor):
        feat_, feat = self.forward_embeddings(x)
        if not self.training:
            return feat_ if self.test_feature == "feat_" else feat
        feat = self.dropout(feat)
        return feat_, feat, self.cls(feat)

    def get_classifier(self) -> nn.Module:
        return self.cls

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new identity classifier ``cls`` (bias-free, N(0, 0.001) as the original; 0: none)."""
        if global_pool is not None:
            if not global_pool:
                raise ConfigError("global_pool='' is not possible for re-id: the BN-neck takes pooled features")
            self.global_pool = GlobalPool(global_pool)
        self.cls = classifier_layer(self.num_features, num_classes, bias=False)
        if num_classes:
            nn.init.normal_(self.cls.weight, std=0.001)
        self.num_classes = num_classes

    # -- backbone (zoo.models._features): the maps of the stem and of each stage after its RGA module --
    feature_head = ("global_pool", "feat_bn", "dropout", "cls")

    def feature_points(self) -> list[FeaturePoint]:
        return [dataclasses.replace(p, module=f"backbone.{p.module}") for p in self.backbone.feature_points()]

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[Tensor]:
        return self.backbone.forward_intermediates(x, indices)


def _build(use_spatial: bool, use_channel: bool, kwargs: dict) -> RGAResNet50:
    for name in ("use_spatial", "use_channel"):
        if name in kwargs:
            raise ArgumentError(f"{name} is fixed by the variant; use rga_sc/rga_s/rga_c_resnet50 instead")
    return RGAResNet50(use_spatial=use_spatial, use_channel=use_channel, **kwargs)


@register_model
def rga_sc_resnet50(**kwargs) -> RGAResNet50:
    """RGA-SC ResNet-50 (spatial then channel attention after each stage), BN-neck re-id head."""
    return _build(True, True, kwargs)


@register_model
def rga_sc_mini(**kwargs) -> RGAResNet50:
    """RelZoo-mini: RGA-SC on a 2-2-2-2 block ResNet at 1/8 width, built for 64x32 inputs (shapes-reid)."""
    return _build(True, True, {"num_classes": 160, "height": 64, "width": 32, "width_div": 8,
                               "layers": [2, 2, 2, 2], "cha_ratio": 2, "spa_ratio": 2, "down_ratio": 2, **kwargs})


@register_model
def rga_s_resnet50(**kwargs) -> RGAResNet50:
    """RGA-S ResNet-50 (spatial relation-aware attention only), BN-neck re-id head."""
    return _build(True, False, kwargs)


@register_model
def rga_c_resnet50(**kwargs) -> RGAResNet50:
    """RGA-C ResNet-50 (channel relation-aware attention only), BN-neck re-id head."""
    return _build(False, True, kwargs)


# ---------------------------------------------------------------------------------------------
# Hooks of convert/rga.yaml (training checkpoints of the original, spec §4)

_VARIANT_MODEL = {(True, True): "rga_sc_resnet50", (True, False): "rga_s_resnet50", (False, True): "rga_c_resnet50"}


def _branches(keys) -> tuple[bool, bool]:
    """(has spatial branch, has channel branch) from the keys of ``backbone.rga_att1``."""
    keys = [k for k in keys if k.startswith("backbone.rga_att1.")]
    return any(".W_spatial." in k for k in keys), any(".W_channel." in k for k in keys)


@register_hook
def kwargs_from_checkpoint(checkpoint) -> dict:
    """Constructor kwargs recorded in an original checkpoint: ``num_classes`` from ``cls.weight``."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
    if not isinstance(state, dict):
        return {}
    weight = state.get("cls.weight", state.get("module.cls.weight"))
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return {}
    return {"num_classes": int(weight.shape[0])}


@register_hook
def check_variant(state_dict: dict, checkpoint, target_state_dict) -> dict:
    """Refuse, with the model name to use, a checkpoint whose RGA variant differs from the target's."""
    if target_state_dict is None:
        return state_dict
    source, target = _branches(state_dict), _branches(target_state_dict)
    if source != target and source in _VARIANT_MODEL and target in _VARIANT_MODEL:
        raise ConversionError(f"the checkpoint is an {_VARIANT_MODEL[source]} (RGA branches spatial={source[0]}, "
                              f"channel={source[1]}) but the target is an {_VARIANT_MODEL[target]}; "
                              f"convert with --model {_VARIANT_MODEL[source]}")
    return state_dict
