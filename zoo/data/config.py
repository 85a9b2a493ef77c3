"""Preprocessing from the weights, as timm does it: :func:`resolve_data_config` and :func:`create_transform`.

::

    model = zoo.create_model("sasa_resnet_mini", pretrained=True)
    config = zoo.data.resolve_data_config(model=model)     # {'input_size': (3, 64, 64), 'interpolation': 'bilinear', ...}
    transform = zoo.data.create_transform(config)           # PIL image -> (3, 64, 64) tensor

The data config is a plain dict with timm's key names (``input_size`` as (in_chans, H, W),
``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) and RelZoo's for what timm has no
name for: ``task``, and per task ``resize_shorter`` / ``max_size`` (detection), ``num_frames`` and,
when stated, ``resize`` (video: every frame resized to it; unstated, the evaluation resizes to
240 x 320 and training to input_size / 0.875, as the original). Values come from the overrides, else the model's ``pretrained_cfg``
(:class:`zoo.config.PretrainedCfg`), else the defaults of the original pipelines
(:mod:`zoo.data.transforms`, the one place that defines the transforms themselves).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

from torch import nn

from zoo.config import Preprocessing
from zoo.data.transforms import (DEFAULT_CROP_PCT, DEFAULT_INPUT_SIZE, DEFAULT_INTERPOLATION, DEFAULT_NUM_FRAMES,
                                 DETR_MAX_SIZE, DETR_RESIZE_SHORTER, IMAGENET_MEAN, IMAGENET_STD, REID_INPUT_SIZE,
                                 ClassificationTrainTransform, DetrTrainTransform,
                                 ReidTrainTransform, VideoEvalTransform, VideoTrainTransform,
                                 classification_eval_transform, detection_eval_transform, reid_eval_transform)
from zoo.errors import ConfigError

__all__ = ["resolve_data_config", "create_transform", "TASK_KINDS"]

#: A model config's ``task`` -> the kind of input pipeline it takes.
TASK_KINDS = {"detection": "detection", "person re-identification": "reid", "video classification": "video",
              "image classification": "classification", "classification": "classification"}
_CROP_MODES = {"classification": "center", "reid": "squash"}  # timm's names: centre crop / resize to exactly
_KEYS = {"task", "input_size", "in_chans", "interpolation", "mean", "std", "crop_pct", "crop_mode", "resize",
         "num_frames", "resize_shorter", "max_size"}


def _input_size(value: Any, in_chans: int) -> tuple[int, int, int]:
    """(C, H, W), (H, W) or an int -> (C, H, W)."""
    if isinstance(value, int):
        return in_chans, value, value
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return (in_chans, *value)
    if len(value) == 3:
        return value
    raise ConfigError(f"input_size: expected (in_chans, height, width), (height, width) or an int, got {value!r}")


def resolve_data_config(model: Optional[nn.Module] = None, pretrained_cfg: Optional[Mapping] = None,
                        **overrides) -> dict[str, Any]:
    """The preprocessing a model's weights expect, with timm's key names (see the module docstring).

    Args:
        model: a model ``zoo.create_model`` built (its ``pretrained_cfg`` is read), or None.
        pretrained_cfg: a :class:`~zoo.config.PretrainedCfg` or any mapping with the same keys;
            overrides the model's.
        **overrides: any key of the data config (``input_size`` also as (H, W) or an int).

    Returns a new dict; an unknown override is a ConfigError listing the known keys.
    """
    unknown = sorted(set(overrides) - _KEYS)
    if unknown:
        raise ConfigError(f"resolve_data_config: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    cfg: Mapping = pretrained_cfg if pretrained_cfg is not None else (getattr(model, "pretrained_cfg", None) or {})

    def pick(key: str, default: Any = None) -> Any:
        for source in (overrides, cfg):
            if source.get(key) is not None:
                return source[key]
        return default

    task = pick("task", "image classification")
    kind = TASK_KINDS.get(task)
    if kind is None:
        raise ConfigError(f"resolve_data_config: unknown task {task!r}; known: {', '.join(TASK_KINDS)}")
    in_chans = int(pick("in_chans", 3))
    default_size = REID_INPUT_SIZE if kind == "reid" else DEFAULT_INPUT_SIZE
    config: dict[str, Any] = {"task": task}
    if kind != "detection" or pick("input_size") is not None:  # a detector takes any size (resize_shorter)
        config["input_size"] = _input_size(pick("input_size", default_size), in_chans)
    config.update({
        "interpolation": pick("interpolation", DEFAULT_INTERPOLATION),
        "mean": tuple(pick("mean", IMAGENET_MEAN)),
        "std": tuple(pick("std", IMAGENET_STD)),
    })
    if kind in _CROP_MODES:
        config["crop_mode"] = pick("crop_mode", _CROP_MODES[kind])
        config["crop_pct"] = float(pick("crop_pct", DEFAULT_CROP_PCT if kind == "classification" else 1.0))
    elif kind == "video":
        config["num_frames"] = int(pick("num_frames", DEFAULT_NUM_FRAMES))
        if pick("resize") is not None:  # else each transform's own: 240 x 320 to evaluate, input_size / 0.875 to train
            config["resize"] = tuple(pick("resize"))
    else:  # detection: DETR's resize of the shorter side
        config["resize_shorter"] = int(pick("resize_shorter", DETR_RESIZE_SHORTER))
        config["max_size"] = int(pick("max_size", DETR_MAX_SIZE))
    return config


def _preprocessing(config: Mapping[str, Any]) -> Preprocessing:
    """The data config's fields as the transforms' typed :class:`~zoo.config.Preprocessing`."""
    fields = {key: config[key] for key in ("interpolation", "mean", "std", "crop_pct", "resize", "num_frames",
                                           "resize_shorter", "max_size") if config.get(key) is not None}
    if config.get("input_size") is not None:
        fields["input_size"] = list(config["input_size"])[-2:]
    return Preprocessing.parse(fields, "data config")


def create_transform(config: Mapping[str, Any], is_training: bool = False, hflip: bool = True) -> Callable:
    """The input pipeline of a data config (:func:`resolve_data_config`), from :mod:`zoo.data.transforms`.

    Evaluation (``is_training=False``):

    - image classification: PIL image -> (3, H, W): resize to input_size / crop_pct, centre crop;
    - person re-identification (``crop_mode`` 'squash'): PIL image -> (3, H, W) resized to exactly input_size;
    - detection: PIL image -> (3, H', W'): DETR's resize (shorter side ``resize_shorter``, longer <= ``max_size``);
    - video: a clip transform, T PIL frames -> (3T, H, W) (frames resized to ``resize``, centre crop).

    Training (``is_training=True``): the same families' augmentation (random crop and flip; re-id's
    random translation; for detection ``(image, boxes, gen)`` -> ``(tensor, boxes)``); each takes an
    optional ``torch.Generator`` last, which seeds its random draws. ``hflip`` False turns off the
    random horizontal flip of classification and detection (video and re-id keep their originals').

    All normalise with ``mean`` / ``std``. Inputs are RGB: a config with ``in_chans`` other than 3 is a
    ConfigError (convert such inputs yourself).
    """
    kind = TASK_KINDS.get(config.get("task", "image classification"))
    if kind is None:
        raise ConfigError(f"create_transform: unknown task {config.get('task')!r}; known: {', '.join(TASK_KINDS)}")
    in_chans = int(list(config.get("input_size") or (config.get("in_chans", 3),))[0])
    if in_chans != 3:
        raise ConfigError(f"create_transform makes RGB inputs (3 channels); this config has in_chans {in_chans}")
    if kind in _CROP_MODES and config.get("crop_mode", _CROP_MODES[kind]) != _CROP_MODES[kind]:
        raise ConfigError(f"create_transform: crop_mode {config['crop_mode']!r} is not the {config['task']} "
                          f"pipeline's ('{_CROP_MODES[kind]}')")
    pre = _preprocessing(config)
    if kind == "detection":
        return DetrTrainTransform(pre, hflip=hflip) if is_training else detection_eval_transform(pre)
    if kind == "reid":
        return ReidTrainTransform(pre) if is_training else reid_eval_transform(pre)
    if kind == "video":
        return VideoTrainTransform(pre) if is_training else VideoEvalTransform(pre)
    return ClassificationTrainTransform(pre, hflip=hflip) if is_training else classification_eval_transform(pre)
