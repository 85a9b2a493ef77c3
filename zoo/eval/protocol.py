"""The interface every family's evaluation protocol implements, and their registry.

A protocol reads a dataset in the ORIGINAL on-disk format, turns samples into model
inputs, the model's outputs into picklable predictions, and the predictions of the
whole dataset into the metrics of the paper's table. The runner
(:mod:`zoo.eval.runner`) does the rest: sharding over processes, gathering, printing.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional, Sequence

from zoo.config import ModelConfig, PretrainedCfg
from zoo.data.config import create_transform, resolve_data_config
from zoo.errors import ConfigError

# Protocol name -> module defining it; imported only when the protocol is asked for,
# so e.g. pycocotools is needed only to evaluate detection.
PROTOCOL_MODULES = {
    "coco": "zoo.eval.coco",
    "reid": "zoo.eval.reid",
    "ssv": "zoo.eval.video",
    "imagenet": "zoo.eval.imagenet",
}

_protocols: dict[str, type] = {}


class Protocol:
    """Base class; subclasses are registered with :func:`register_protocol`.

    Args:
        data_dir: dataset root, in the original's on-disk layout.
        model_config: config of the model being evaluated (preprocessing, options).
        options: the config's ``eval`` mapping without ``protocol`` (plus CLI overrides).
        limit: evaluate only the first ``limit`` samples (``dataset()`` must honour it).
    """

    name: str = ""
    #: Which dataset the numbers belong to (matched against ``ReportedMetric.dataset``); None = any.
    dataset_name: Optional[str] = None
    #: Which split of it is evaluated (compared with ``ReportedMetric.split``); None = not stated.
    split: Optional[str] = None
    #: The input pipeline the protocol feeds (a task of :data:`zoo.data.config.TASK_KINDS`).
    task: str = "image classification"

    def __init__(self, data_dir: Path, model_config: ModelConfig, options: dict, limit: Optional[int] = None):
        self.data_dir = Path(data_dir)
        self.model_config = model_config
        self.options = dict(options)
        self.limit = limit
        #: Curves of the last :meth:`compute`, name -> JSON-ready data (``pr_curve`` for COCO, ``cmc`` for
        #: re-id; :mod:`zoo.viz.curves` draws them); empty for protocols that have none.
        self.curves: dict[str, dict] = {}
        #: ``{class id: {metric: value}}`` of the last :meth:`compute`, where the protocol has per-class numbers.
        self.per_class_metrics: dict[int, dict[str, float]] = {}

    def dataset(self) -> Sequence:
        """Indexable samples (picklable, e.g. ``(image_tensor, meta)``), at most ``limit`` of them."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        """Samples -> one batch for :meth:`predict`."""
        raise NotImplementedError

    def predict(self, model, batch, device) -> list:
        """Run the model; one picklable prediction per sample, in batch order."""
        raise NotImplementedError

    def compute(self, predictions: list) -> dict[str, float]:
        """Predictions of all samples, in dataset order -> ``{metric: value}`` in the paper's units (and,
        where the protocol has them, :attr:`curves` and :attr:`per_class_metrics` set)."""
        raise NotImplementedError

    def class_names(self) -> dict[int, str]:
        """The dataset's own names of its class ids, where it has them (COCO categories, class folders)."""
        return {}

    def eval_transform(self, **overrides):
        """The evaluation transform of :attr:`task` with the model config's preprocessing and ``overrides``
        (timm's key names), made by :func:`zoo.data.resolve_data_config` and :func:`zoo.data.create_transform`."""
        config = resolve_data_config(pretrained_cfg=PretrainedCfg.build(self.model_config),
                                     **{"task": self.task, **overrides})
        return create_transform(config)


def register_protocol(name: str):
    """Class decorator: ``@register_protocol('reid')``."""

    def wrap(cls):
        cls.name = name
        _protocols[name] = cls
        return cls

    return wrap


def get_protocol(name: str) -> type:
    if name not in _protocols and name in PROTOCOL_MODULES:
        importlib.import_module(PROTOCOL_MODULES[name])
    if name not in _protocols:
        raise ConfigError(f"unknown evaluation protocol '{name}'; known: {sorted(PROTOCOL_MODULES)}")
    return _protocols[name]
