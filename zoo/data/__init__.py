"""Datasets, transforms and the preprocessing a model's weights expect.

``zoo.data.resolve_data_config`` and ``zoo.data.create_transform`` (:mod:`zoo.data.config`) and
``zoo.data.label_names`` (:mod:`zoo.data.labels`) load on first use (PEP 562), so importing a
light submodule (``zoo.data.synthetic`` for ``python -m zoo --help``) does not import torch.
"""
import importlib

__all__ = ["resolve_data_config", "create_transform", "label_names"]

_HOMES = {"resolve_data_config": "zoo.data.config", "create_transform": "zoo.data.config",
          "label_names": "zoo.data.labels"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'zoo.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
