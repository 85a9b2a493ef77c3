"""The classifier heads' shared pieces, as timm names them: global pooling and the classifier layer.

Every classification, re-id and video model of the zoo has timm's classifier API::

    model.forward_features(x)                  # the unpooled feature map (tokens for DeiT)
    model.forward_head(features, pre_logits=False)   # pool (+ the model's neck) + classifier
    model.get_classifier()                     # the classifier module
    model.reset_classifier(num_classes, global_pool=None)   # a new head; 0 = no classifier (pooled features)

``forward(x) == forward_head(forward_features(x))`` (for re-id in eval mode the model returns its test
feature instead of logits, as before). ``global_pool`` names the pooling over every axis after the
channels (H, W; for video each frame's H, W): :data:`POOL_TYPES`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from zoo.errors import ConfigError

__all__ = ["POOL_TYPES", "GlobalPool", "PooledClassifier", "check_pooling", "classifier_layer"]

#: ``global_pool`` values: average, maximum, their mean, or '' (no pooling, with num_classes=0 only).
POOL_TYPES = ("avg", "max", "avgmax", "")


class GlobalPool(nn.Module):
    """Pools every axis from ``start_dim`` on: (B, C, *spatial) -> (B, C) (``pool_type`` '' keeps the input).

    ``start_dim`` 2 pools H, W (or T, H, W); RSANet pools each frame's H, W with ``start_dim`` 3.
    """

    def __init__(self, pool_type: str = "avg", start_dim: int = 2):
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ConfigError(f"global_pool must be one of {', '.join(repr(p) for p in POOL_TYPES)}, got {pool_type!r}")
        self.pool_type, self.start_dim = pool_type, start_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pool_type:
            return x
        dims = tuple(range(self.start_dim, x.dim()))
        if self.pool_type == "avg":
            return x.mean(dim=dims)
        peak = x.amax(dim=dims)
        return peak if self.pool_type == "max" else 0.5 * (peak + x.mean(dim=dims))

    def extra_repr(self) -> str:
        return repr(self.pool_type)


def classifier_layer(num_features: int, num_classes: int, bias: bool = True) -> nn.Module:
    """``nn.Linear(num_features, num_classes)``, or ``nn.Identity()`` for ``num_classes`` 0 (timm's rule)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ConfigError(f"num_classes must be a non-negative int (0: no classifier), got {num_classes!r}")
    return nn.Linear(num_features, num_classes, bias=bias) if num_classes > 0 else nn.Identity()


def check_pooling(pool_type: str, num_classes: int) -> None:
    """No pooling ('') leaves a map, which only a model without a classifier can return."""
    if pool_type == "" and num_classes:
        raise ConfigError("global_pool='' (no pooling) needs num_classes=0: a classifier needs pooled features")


class PooledClassifier:
    """timm's head of a model that pools a map and classifies it: ``global_pool`` then the layer named
    :attr:`classifier_name` (``fc``). A mixin of an ``nn.Module`` that has ``num_features``."""

    classifier_name = "fc"

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The map -> pooled features (B, C) (``pre_logits``) or logits (B, num_classes)."""
        x = self.global_pool(x)
        return x if pre_logits else self.get_classifier()(x)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none, the model returns pooled features), and
        optionally another pooling (:data:`POOL_TYPES`)."""
        current = getattr(getattr(self, "global_pool", None), "pool_type", "avg")
        pool_type = current if global_pool is None else global_pool
        check_pooling(pool_type, num_classes)
        self.global_pool = GlobalPool(pool_type)
        setattr(self, self.classifier_name, classifier_layer(self.num_features, num_classes))
        self.num_classes = num_classes
