"""Backbones: ``create_model(name, features_only=True, out_indices=(...))``, as timm's ``_features.py``.

A model that can be a backbone implements

- ``feature_points() -> list[FeaturePoint]``: every map it can return, in order (index 0 the stem);
- ``forward_intermediates(x, indices) -> list[Tensor]``: the maps at ``indices`` for the model's own input;
- ``feature_head``: the attribute paths of what a backbone does not need (classifier, neck, detection
  heads), removed by :class:`FeatureListNet`.

:class:`FeatureListNet` wraps such a model (as timm's ``FeatureGetterNet``: its state-dict keys are
the model's under ``model.``); ``model(x)`` returns the list of maps and ``model.feature_info``
describes them (``channels()``, ``reduction()``, ``module_name()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from zoo.errors import ConfigError

__all__ = ["FeaturePoint", "FeatureInfo", "FeatureListNet"]


@dataclass(frozen=True)
class FeaturePoint:
    """One feature map a backbone returns: the module that makes it, its channels, its total stride."""

    module: str
    num_chs: int
    reduction: int


class FeatureInfo:
    """The maps a :class:`FeatureListNet` returns, in order (timm's ``FeatureInfo``)."""

    def __init__(self, points: Sequence[FeaturePoint], out_indices: Sequence[int]):
        self.points = [points[i] for i in out_indices]
        self.out_indices = tuple(out_indices)

    def _get(self, field: str, idx: Optional[int]) -> Union[list, int, str]:
        values = [getattr(point, field) for point in self.points]
        return values if idx is None else values[idx]

    def channels(self, idx: Optional[int] = None):
        """Channels of every map (or of map ``idx``)."""
        return self._get("num_chs", idx)

    def reduction(self, idx: Optional[int] = None):
        """Total stride of every map (or of map ``idx``) relative to the input."""
        return self._get("reduction", idx)

    def module_name(self, idx: Optional[int] = None):
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        return [{"module": p.module, "num_chs": p.num_chs, "reduction": p.reduction, "index": i}
                for p, i in zip(self.points, self.out_indices)]

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, idx: int) -> dict:
        return self.get_dicts()[idx]

    def __repr__(self) -> str:
        return f"FeatureInfo({self.get_dicts()})"


def _remove(model: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if hasattr(parent, name):
        delattr(parent, name)


class FeatureListNet(nn.Module):
    """A backbone made of ``model``: ``forward(x)`` -> the feature maps at ``out_indices``.

    Args:
        model: a model with ``feature_points``, ``forward_intermediates`` and ``feature_head``
            (its head modules are removed: the wrapped model is for this use only).
        out_indices: which of ``model.feature_points()`` to return (negative counts from the end);
            default all of them.

    ``feature_info`` describes the maps; ``pruned`` lists the removed modules' state-dict prefixes
    (``model.fc.``), which a full model's checkpoint holds and this one does not.
    """

    def __init__(self, model: nn.Module, out_indices: Optional[Sequence[int]] = None):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ConfigError(f"{type(model).__name__} cannot be a backbone (features_only): it has no feature maps")
        points = model.feature_points()
        indices = tuple(range(len(points))) if out_indices is None else tuple(int(i) for i in out_indices)
        bad = [i for i in indices if not -len(points) <= i < len(points)]
        if not indices or bad:
            raise ConfigError(f"out_indices {list(indices)}: {type(model).__name__} has feature maps 0..{len(points) - 1} "
                              f"({', '.join(p.module for p in points)})")
        self.out_indices = tuple(i % len(points) for i in indices)
        self.feature_info = FeatureInfo(points, self.out_indices)
        self.pruned = tuple(f"model.{path}." for path in model.feature_head)
        for path in model.feature_head:
            _remove(model, path)
        self.model = model

    def forward(self, x) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices)
