"""Building models: ``create_model`` and ``convert_checkpoint``, the top of the loading path.

``create_model(name, pretrained=True)`` goes one way down the package::

    registry (constructor + config) -> constructor(**kwargs) -> weights (fetch, verify, cache;
    convert an original checkpoint once with its map) -> checkpoint.load_into (strict) -> model.eval()

``convert_checkpoint`` is the same path written to disk: fetch an original checkpoint, find the
target model and map (:mod:`zoo.detect`: what the checkpoint records, else its key/shape signature),
build the model, convert with the map, check strictly, write a RelZoo folder (:mod:`zoo.hub`).
``create_model(name, weights=<original checkpoint>)`` finds the map the same way and converts once
into the cache. Nothing below this module imports it (timm's ``_factory.py`` / ``_builder.py`` role).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from zoo import weights as weights_lib
from zoo._fs import sha256_file
from zoo.checkpoint import compare_state_dicts, load_checkpoint, load_into
from zoo.config import ModelConfig, WeightsEntry
from zoo.convert import ConversionMap, convert_state_dict, load_map
from zoo.detect import best_fit_hint, detect, model_signature
from zoo.errors import CheckpointError, ConfigError, ConversionError
from zoo.hub import check_out_dir, jsonable, model_card, write_model_folder
from zoo.registry import model_constructor, model_info, split_name

logger = logging.getLogger(__name__)

__all__ = ["create_model", "convert_checkpoint"]


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


def _original_checkpoint(base: str, entry: WeightsEntry, converter: Optional[str], ema: bool, kwargs: dict,
                         overrides: dict) -> tuple[Optional[str], dict, Any]:
    """For a user's weights file: (the map that converts it into ``base`` or None, the constructor kwargs the
    checkpoint records, the checkpoint read). A flat state dict that fits ``base`` (built with ``kwargs``) as
    it is needs no map."""
    path = weights_lib.fetch(entry.source, entry.sha256)
    if path.is_dir() or (converter is None and not ema and path.name.endswith(".safetensors")):
        return None, {}, None
    checkpoint = load_checkpoint(path)
    if converter is None and not ema and isinstance(checkpoint, dict) and checkpoint and \
            not compare_state_dicts(checkpoint, model_signature(base, kwargs)):
        return None, {}, checkpoint
    found = detect(checkpoint, converter, base, overrides, ema=ema)
    return found.converter, found.kwargs, checkpoint


def create_model(name: str, pretrained: bool = False, weights: Union[str, Path, None] = None, *,
                 converter: Optional[str] = None, ema: bool = False, **overrides) -> nn.Module:
    """Build a registered model, optionally with weights, like ``timm.create_model``.

    Args:
        name: a registered name, optionally ``name.tag`` to pick a weights entry.
        pretrained: load the tag's (or the default) weights entry of the config.
        weights: a weights tag, a local file or RelZoo folder, an https URL or
            ``hf://org/repo[@rev]/file``. Overrides ``pretrained``. An original project's training
            checkpoint is recognised (:func:`zoo.detect.detect`: which map converts it into this model,
            with the constructor kwargs it records) and converted once into the cache.
        converter: the conversion map (``convert/<name>.yaml``) of an original checkpoint, instead of
            recognising it.
        ema: load the checkpoint's EMA weights (``model_ema``) instead of its main ones.
        **overrides: constructor kwargs, applied over the config's kwargs (and over the
            kwargs recorded in a RelZoo folder's ``config.json`` or read off an original checkpoint).

    Returns the model; in eval mode when weights were loaded, else as constructed.
    """
    base, tag = split_name(name)
    constructor = model_constructor(base)
    cfg = model_info(base)
    entry = _weights_request(cfg, tag, pretrained, weights)

    kwargs = dict(cfg.kwargs)
    checkpoint = None
    if entry is not None:
        converter = converter or entry.converter
        recorded = weights_lib.read_folder_config(entry.source)
        if recorded and recorded.get("model") in (None, base):
            kwargs.update(recorded.get("kwargs") or {})
        elif recorded is None and entry.converter is None:  # a user's file: maybe an original checkpoint
            converter, found_kwargs, checkpoint = _original_checkpoint(base, entry, converter, ema,
                                                                       {**kwargs, **overrides}, overrides)
            kwargs.update(found_kwargs)
    kwargs.update(overrides)
    model = constructor(**kwargs)
    if entry is None:
        return model
    state_dict = weights_lib.load_state_dict(entry.source, sha256=entry.sha256, converter=converter, model=model,
                                             ema=ema, checkpoint=checkpoint)
    load_into(model, state_dict, strict=True)
    return model.eval()


def convert_checkpoint(src: str | os.PathLike, from_map: str | ConversionMap | None = None,
                       out_dir: str | os.PathLike | None = None, model_name: str | None = None,
                       model_kwargs: dict | None = None, strict: bool = True, *, model: nn.Module | None = None,
                       source: str | None = None, ema: bool = False) -> Path:
    """Convert an original checkpoint into a RelZoo folder and return the folder's path.

    The target model and map are what :func:`zoo.detect.detect` finds: the model the checkpoint records
    (DeiT's ``args.model``, leaderj1001's ``arch``), else the registered model whose keys and shapes the
    converted checkpoint fits; ``from_map`` and ``model_name`` narrow it (both given: no detection).
    The model is ``create_model(model_name, **kwargs)``, kwargs being the map's ``model_kwargs`` hook
    result (what the checkpoint records, and the behaviour flags its weights need, e.g.
    ``bug_compatible=True``) updated by ``model_kwargs``; a caller may instead pass a built ``model``
    (with ``from_map``, and ``model_name`` naming it for config.json). ``ema``: convert the checkpoint's
    EMA weights (``model_ema``). The converted state dict is checked with :func:`zoo.checkpoint.load_into`
    (strict by default: a failure names the registered model that fits; with strict=False the keys that
    fit are written and the report is kept in config.json). Writes, atomically (:mod:`zoo.hub`):

    - ``model.safetensors``
    - ``config.json``: ``{"model", "kwargs", "converter", "converter_version", "source", "source_sha256"}``
      (and ``"ema": true`` for EMA weights)
    - ``README.md``: a model card with YAML front matter (``library_name: relzoo``, tags, and
      ``model-index`` with the registry's reported metrics when known).

    ``src`` is a local file, an http(s) URL or an ``hf://`` file (downloaded through
    :func:`zoo.weights.fetch` first). ``source`` overrides what config.json records as the origin.
    """
    if out_dir is None:
        raise TypeError("convert_checkpoint() needs out_dir, the folder to write")
    cmap = load_map(from_map) if isinstance(from_map, (str, os.PathLike)) else from_map
    parsed = weights_lib.parse_source(src)
    source = source or (str(parsed.path) if parsed.kind == "local" else parsed.text)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    path = weights_lib.fetch(parsed)  # a URL or hf:// source is downloaded (and cached) first
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; convert_checkpoint needs a checkpoint file")

    checkpoint = load_checkpoint(path)
    if model is None and (cmap is None or model_name is None):
        found = detect(checkpoint, cmap, model_name, model_kwargs, ema=ema)
        cmap, name, kwargs = found.map, found.model, found.kwargs
        logger.info("%s: converting into %s with map '%s' (%s)", path, name, cmap.name, found.how)
    else:
        if cmap is None:
            raise ConfigError("convert_checkpoint(model=...) needs from_map, the map to convert with")
        kwargs_hook = cmap.hook("model_kwargs")
        kwargs = {**((kwargs_hook(checkpoint) or {}) if kwargs_hook is not None else {}), **(model_kwargs or {})}
        name = model_name
    if model is None:
        model = create_model(name, **kwargs)
    name = name or type(model).__name__

    state = convert_state_dict(checkpoint, cmap, model.state_dict(), ema=ema)
    try:
        report = load_into(model, state, strict=strict)
    except ConversionError as exc:
        raise ConversionError(f"{exc}\nconverted with map '{cmap.name}' into {name}"
                              f"{best_fit_hint(checkpoint, name, ema=ema)}") from None
    if report:
        state = {k: v for k, v in state.items() if k not in report.unexpected and k not in report.mismatched}

    config = {
        "model": name,
        "kwargs": jsonable(kwargs),
        "converter": cmap.name,
        "converter_version": cmap.version,
        "source": source,
        "source_sha256": sha256_file(path),
    }
    if ema:
        config["ema"] = True
    if report:
        config["incomplete"] = {"missing": sorted(report.missing), "unexpected": sorted(report.unexpected),
                                "mismatched": sorted(report.mismatched)}

    origin = f"Converted for RelZoo from `{config['source']}` with the `{cmap.name}` map (version {cmap.version})."
    card = model_card(name, config, origin, extra_tags=[f"converter:{cmap.name}"])
    write_model_folder(out_dir, state, config, card, metadata={"converter": cmap.name})
    logger.info("converted %s with map '%s' into %s", path, cmap.name, out_dir)
    return out_dir
