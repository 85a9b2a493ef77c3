"""The CIFAR-10 toy network of ``inspiros/rpa_sa`` (its tests' ``RelativePositionAwareModel``, spec rpa §7).

The only complete network in the original repository: two small conv stages, each followed by a
relative-position-aware non-local block and a BatchNorm. No padding anywhere, so a 32x32 input gives
hidden maps of 14x14 (first block) and 6x6 (second block). Its checkpoints are bare state dicts with the
same keys as this module (``convert/rpa-toy.yaml``).
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.convert import register_hook
from zoo.layers.rpa import MultiheadNonlocal2d
from zoo.models._head import PooledClassifier
from zoo.models._inputs import check_batch, weight_dtype
from zoo.registry import register_model


class RpaCifarToy(PooledClassifier, nn.Module):
    """conv-BN-ReLU x2, avgpool 2, [non-local + BN], conv-BN-ReLU, avgpool 2, [non-local + BN], GAP, fc.

    Args:
        num_classes: logits of the final Linear(64, num_classes).
        rpa_kernel_size: relative_position kernel of both blocks (the original: 7).
        rpa_interpolation: the original passes ``'lerp'``, which its op silently treated as nearest, so
            trained weights expect ``'nearest'`` (the default here, same numbers as the fixture).
        bug_compatible: passed to both blocks (only matters with ``'lerp'``: True makes it nearest).
        in_chans: input channels (3: RGB).
        global_pool: the pooling before ``fc`` (``'avg'``, the original's; ``'max'``, ``'avgmax'``, or
            ``''`` with num_classes 0).

    Input (B, in_chans, 32, 32) -> logits (B, num_classes) (0: pooled features (B, 64)). Other sizes
    work if both hidden maps stay >= 1.
    """

    def __init__(self, num_classes: int = 10, rpa_kernel_size: int = 7, rpa_interpolation: str = "nearest",
                 bug_compatible: bool = False, in_chans: int = 3, global_pool: str = "avg"):
        super().__init__()
        self.in_chans = in_chans
        block = dict(rpa_mode="relative_position", rpa_kernel_size=rpa_kernel_size,
                     rpa_interpolation=rpa_interpolation, bug_compatible=bug_compatible)
        # Indices 0..5 / 0..2 are the original's (its state_dict keys are layer1.{0,1,3,4}.*, layer2.{0,1}.*).
        self.layer1 = nn.Sequential(nn.Conv2d(in_chans, 16, 3), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                    nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.pool1 = nn.AvgPool2d(2)
        self.nl1 = nn.Sequential(MultiheadNonlocal2d(32, **block), nn.BatchNorm2d(32))
        self.layer2 = nn.Sequential(nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.pool2 = nn.AvgPool2d(2)
        self.nl2 = nn.Sequential(MultiheadNonlocal2d(64, **block), nn.BatchNorm2d(64))
        self.num_features = 64
        self.reset_classifier(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> the second block's map (B, 64, h, w)."""
        # two unpadded 3x3 convs, a 2x2 pool, another 3x3 conv and pool: 12 pixels leave a 1x1 map
        check_batch(x, model="RpaCifarToy", layout=f"(B, {self.in_chans}, H, W)", rank=4, channels=self.in_chans,
                    dtype=weight_dtype(self), min_size=12)
        x = self.nl1(self.pool1(self.layer1(x)))
        return self.nl2(self.pool2(self.layer2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


@register_model
def rpa_cifar_toy(**kwargs) -> RpaCifarToy:
    """CIFAR-10 toy classifier of the rpa_sa repository (two relative_position non-local blocks)."""
    return RpaCifarToy(**kwargs)


@register_hook
def kwargs_from_checkpoint(checkpoint) -> dict:
    """``model_kwargs`` hook of ``convert/rpa-toy.yaml``: the flags and sizes an original checkpoint needs.

    The weights were trained with the original's behaviour, so ``bug_compatible=True`` (its 'lerp' meant
    nearest, its non-square tables were transposed); ``num_classes`` from ``fc.weight``.
    """
    state = checkpoint if isinstance(checkpoint, dict) else {}
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    weight = state.get("fc.weight", state.get("module.fc.weight"))
    kwargs: dict = {"bug_compatible": True}
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        kwargs["num_classes"] = int(weight.shape[0])
    return kwargs
