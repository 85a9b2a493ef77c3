"""The model registry: named constructors, their configs, and ``create_model``.

Names follow timm: ``name`` or ``name.tag`` where the tag picks a weights entry
(``detr_r50_irpe_product_ctx_9x9.coco_300ep``).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

from zoo.config import ModelConfig, WeightsEntry, all_model_configs
from zoo.errors import ConfigError, UnknownModelError

_constructors: dict[str, Callable[..., nn.Module]] = {}
_models_imported = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; its config is ``configs/*.yaml: models.<name>``."""
    name = fn.__name__
    if name in _constructors and _constructors[name] is not fn:
        raise ValueError(f"model '{name}' is registered twice ({_constructors[name].__module__} and {fn.__module__})")
    _constructors[name] = fn
    return fn


def _import_model_modules() -> None:
    """Import every module of ``zoo.models`` once, which runs their ``@register_model``."""
    global _models_imported
    if _models_imported:
        return
    _models_imported = True
    import zoo.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"zoo.models.{info.name}")


def split_name(name: str) -> tuple[str, Optional[str]]:
    """``'model.tag'`` -> ``('model', 'tag')``; ``'model'`` -> ``('model', None)``."""
    base, _, tag = name.partition(".")
    return base, (tag or None)


def _registered() -> dict[str, Callable[..., nn.Module]]:
    _import_model_modules()
    return _constructors


def _unknown(name: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, list(_registered()), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `python -m zoo list`"
    return UnknownModelError(f"unknown model '{name}'{hint}")


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered names matching an fnmatch ``pattern``; ``pretrained=True`` lists ``name.tag`` for
    every weights entry instead (what ``create_model(..., pretrained=True)`` can load)."""
    configs = all_model_configs()
    names = []
    for name in sorted(_registered()):
        if pretrained:
            names += [f"{name}.{tag}" for tag in configs[name].weights] if name in configs else []
        else:
            names.append(name)
    return [n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(split_name(n)[0], pattern)]


def model_info(name: str) -> ModelConfig:
    """The config of ``name`` (a ``.tag`` suffix is accepted and ignored)."""
    base, _ = split_name(name)
    if base not in _registered():
        raise _unknown(base)
    configs = all_model_configs()
    if base not in configs:
        raise ConfigError(f"model '{base}' is registered in code but has no entry in configs/*.yaml")
    return configs[base]


def model_constructor(name: str) -> Callable[..., nn.Module]:
    base, _ = split_name(name)
    constructors = _registered()
    if base not in constructors:
        raise _unknown(base)
    return constructors[base]


def _weights_request(cfg: ModelConfig, tag: Optional[str], pretrained: bool,
                     weights: Union[str, Path, None]) -> Optional[WeightsEntry]:
    """Turn ``pretrained``/``weights``/``name.tag`` into one weights entry, or None for random init."""
    if weights is not None:
        weights = str(weights)
        if weights in cfg.weights:
            return cfg.weights[weights]
        return WeightsEntry(tag="user", source=weights)
    if pretrained or tag:
        return cfg.weights_entry(tag)
    return None


def create_model(name: str, pretrained: bool = False, weights: Union[str, Path, None] = None,
                 **overrides) -> nn.Module:
    """Build a registered model, optionally with weights, like ``timm.create_model``.

    Args:
        name: a registered name, optionally ``name.tag`` to pick a weights entry.
        pretrained: load the tag's (or the default) weights entry of the config.
        weights: a weights tag, a local file or converted folder, an https URL or
            ``hf://org/repo[@rev]/file``. Overrides ``pretrained``.
        **overrides: constructor kwargs, applied over the config's kwargs (and over the
            kwargs recorded in a converted folder's ``config.json``).

    Returns the model; in eval mode when weights were loaded, else as constructed.
    """
    base, tag = split_name(name)
    constructor = model_constructor(base)
    cfg = model_info(base)
    entry = _weights_request(cfg, tag, pretrained, weights)

    kwargs = dict(cfg.kwargs)
    if entry is not None:
        from zoo import weights as weights_lib

        recorded = weights_lib.read_folder_config(entry.source)
        if recorded and recorded.get("model") in (None, base):
            kwargs.update(recorded.get("kwargs") or {})
    kwargs.update(overrides)
    model = constructor(**kwargs)
    if entry is None:
        return model

    from zoo.convert import load_into

    state_dict = weights_lib.load_state_dict(entry.source, sha256=entry.sha256, converter=entry.converter, model=model)
    load_into(model, state_dict, strict=True)
    return model.eval()
