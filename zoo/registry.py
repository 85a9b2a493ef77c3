"""The model registry: a plain table of named constructors and their configs.

Names follow timm: ``name`` or ``name.tag`` where the tag picks a weights entry
(``detr_r50_irpe_product_ctx_9x9.coco_300ep``). Model files register their constructors with
:func:`register_model`; the first lookup imports every module of :mod:`zoo.models` (the one
import that runs upward, as timm's and torchvision's registries do). Building a model with
weights is :func:`zoo.factory.create_model`, one floor up; this module imports no loading code.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import json
import pkgutil
from typing import TYPE_CHECKING, Callable, Optional

from zoo.config import ModelConfig, all_model_configs
from zoo.errors import ConfigError, UnknownModelError

if TYPE_CHECKING:  # torch only for the annotations: listing and describing models imports no torch
    from torch import nn

_constructors: dict[str, Callable[..., nn.Module]] = {}
_models_imported = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; its config is ``configs/*.yaml: models.<name>``."""
    name = fn.__name__
    if name in _constructors and _constructors[name] is not fn:
        raise ConfigError(f"model '{name}' is registered twice ({_constructors[name].__module__} and {fn.__module__})")
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
    known = set(_registered()) | set(all_model_configs())
    close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `python -m zoo list`"
    return UnknownModelError(f"unknown model '{name}'{hint}")


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Model names matching an fnmatch ``pattern``; ``pretrained=True`` lists ``name.tag`` for every
    weights entry instead (what ``create_model(..., pretrained=True)`` can load).

    The names are those of ``configs/*.yaml`` and of constructors registered so far: every model of
    :mod:`zoo.models` has both (a test holds them equal), so listing imports no model code (the
    detection models pull in torchvision's detection package, which ``zoo list`` does not need).
    """
    configs = all_model_configs()
    names = []
    for name in sorted(set(configs) | set(_constructors)):
        if pretrained:
            names += [f"{name}.{tag}" for tag in configs[name].weights] if name in configs else []
        else:
            names.append(name)
    return [n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(split_name(n)[0], pattern)]


def model_info(name: str) -> ModelConfig:
    """The config of ``name`` (a ``.tag`` suffix is accepted and ignored); imports no model code."""
    base, _ = split_name(name)
    configs = all_model_configs()
    if base in configs:
        return configs[base]
    if base not in _registered():
        raise _unknown(base)
    raise ConfigError(f"model '{base}' is registered in code but has no entry in configs/*.yaml")


def format_info(name: str) -> str:
    """What ``zoo info NAME`` prints: description, kwargs, preprocessing, weights, reported table, notes."""
    cfg = model_info(name)
    lines = [f"{cfg.name}  ({cfg.family}: {cfg.task})"]
    if cfg.description:
        lines.append(f"  {cfg.description}")
    if cfg.kwargs:
        lines.append(f"  constructor kwargs: {json.dumps(cfg.kwargs)}")
    if cfg.preprocessing:
        lines.append(f"  preprocessing: {json.dumps(dict(cfg.preprocessing))}")
    if cfg.eval:
        lines.append(f"  evaluation: {json.dumps(cfg.eval)}")
    lines.append("  weights:" if cfg.weights else "  weights: none published")
    for tag, entry in cfg.weights.items():
        default = " (default)" if tag == cfg.default_weights else ""
        sha = entry.sha256 or "unknown (recorded on first download)"
        conv = f", converted with '{entry.converter}'" if entry.converter else ""
        lines.append(f"    {cfg.name}.{tag}{default}: {entry.source}{conv}; sha256 {sha}")
        labels = entry.label_names if isinstance(entry.label_names, str) or entry.label_names is None \
            else f"{len(entry.label_names)} names"
        lines.append(f"      classes: {labels or 'none (an embedding)'}; license: {entry.license or cfg.license or 'not stated'}")
        if entry.note:
            lines.append(f"      {entry.note}")
    if cfg.reported:
        lines += ["  reported:", "    | metric | value | dataset | weights | source |", "    |---|---|---|---|---|"]
        for r in cfg.reported:
            flag = "" if r.verified else " (unverified)"
            note = f"; {r.note}" if r.note else ""
            lines.append(f"    | {r.metric} | {r.value:g} | {r.dataset} | {r.weights or 'paper'} | {r.source}{flag}{note} |")
    if cfg.paper or cfg.license:
        lines.append(f"  paper: {cfg.paper or 'not stated'}; license of the original: {cfg.license or 'not stated'}")
    if cfg.notes:
        lines += ["  notes:"] + [f"    {line}" for line in cfg.notes.strip().splitlines()]
    return "\n".join(lines)


def model_constructor(name: str) -> Callable[..., nn.Module]:
    """The registered constructor of ``name`` (a ``.tag`` suffix is accepted and ignored)."""
    base, _ = split_name(name)
    constructors = _registered()
    if base not in constructors:
        raise _unknown(base)
    return constructors[base]
