"""Building models: ``create_model`` and ``convert_checkpoint``, the top of the loading path.

``create_model(name, pretrained=True)`` goes one way down the package::

    registry (constructor + config) -> constructor(**kwargs) -> weights (fetch, verify, cache;
    convert an original checkpoint once with its map) -> checkpoint.load_into (strict) -> model.eval()

``convert_checkpoint`` is the same path written to disk: fetch an original checkpoint, build the
target model, convert with the map, check strictly, write a RelZoo folder (:mod:`zoo.hub`).
Nothing below this module imports it (timm's ``_factory.py`` / ``_builder.py`` role).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from zoo import weights as weights_lib
from zoo._fs import sha256_file
from zoo.checkpoint import load_checkpoint, load_into
from zoo.config import ModelConfig, WeightsEntry
from zoo.convert import ConversionMap, convert_state_dict, load_map
from zoo.errors import CheckpointError, ConfigError
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


def create_model(name: str, pretrained: bool = False, weights: Union[str, Path, None] = None,
                 **overrides) -> nn.Module:
    """Build a registered model, optionally with weights, like ``timm.create_model``.

    Args:
        name: a registered name, optionally ``name.tag`` to pick a weights entry.
        pretrained: load the tag's (or the default) weights entry of the config.
        weights: a weights tag, a local file or RelZoo folder, an https URL or
            ``hf://org/repo[@rev]/file``. Overrides ``pretrained``.
        **overrides: constructor kwargs, applied over the config's kwargs (and over the
            kwargs recorded in a RelZoo folder's ``config.json``).

    Returns the model; in eval mode when weights were loaded, else as constructed.
    """
    base, tag = split_name(name)
    constructor = model_constructor(base)
    cfg = model_info(base)
    entry = _weights_request(cfg, tag, pretrained, weights)

    kwargs = dict(cfg.kwargs)
    if entry is not None:
        recorded = weights_lib.read_folder_config(entry.source)
        if recorded and recorded.get("model") in (None, base):
            kwargs.update(recorded.get("kwargs") or {})
    kwargs.update(overrides)
    model = constructor(**kwargs)
    if entry is None:
        return model
    state_dict = weights_lib.load_state_dict(entry.source, sha256=entry.sha256, converter=entry.converter, model=model)
    load_into(model, state_dict, strict=True)
    return model.eval()


def convert_checkpoint(src: str | os.PathLike, from_map: str | ConversionMap, out_dir: str | os.PathLike,
                       model_name: str | None = None, model_kwargs: dict | None = None, strict: bool = True,
                       *, model: nn.Module | None = None, source: str | None = None) -> Path:
    """Convert an original checkpoint into a RelZoo folder and return the folder's path.

    The target is ``create_model(model_name or cmap.target_model, **kwargs)``, kwargs being the
    map's ``model_kwargs`` hook result updated by ``model_kwargs``; a caller may instead pass a built
    ``model`` (with ``model_name`` naming it for config.json). The converted state dict is checked
    with :func:`zoo.checkpoint.load_into` (strict by default; with strict=False the keys that fit
    are written and the report is kept in config.json). Writes, atomically (:mod:`zoo.hub`):

    - ``model.safetensors``
    - ``config.json``: ``{"model", "kwargs", "converter", "converter_version", "source", "source_sha256"}``
    - ``README.md``: a model card with YAML front matter (``library_name: relzoo``, tags, and
      ``model-index`` with the registry's reported metrics when known).

    ``src`` is a local file, an http(s) URL or an ``hf://`` file (downloaded through
    :func:`zoo.weights.fetch` first). ``source`` overrides what config.json records as the origin.
    """
    cmap = load_map(from_map) if not isinstance(from_map, ConversionMap) else from_map
    parsed = weights_lib.parse_source(src)
    source = source or (str(parsed.path) if parsed.kind == "local" else parsed.text)
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    path = weights_lib.fetch(parsed)  # a URL or hf:// source is downloaded (and cached) first
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; convert_checkpoint needs a checkpoint file")

    checkpoint = load_checkpoint(path)
    kwargs: dict = {}
    kwargs_hook = cmap.hook("model_kwargs")
    if kwargs_hook is not None:
        kwargs.update(kwargs_hook(checkpoint) or {})
    kwargs.update(model_kwargs or {})

    name = model_name or cmap.target_model
    if model is None:
        if not name:
            raise ConfigError(f"conversion map '{cmap.name}' has no target_model; pass model_name (--model NAME)")
        model = create_model(name, **kwargs)
    name = name or type(model).__name__

    state = convert_state_dict(checkpoint, cmap, model.state_dict())
    report = load_into(model, state, strict=strict)
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
    if report:
        config["incomplete"] = {"missing": sorted(report.missing), "unexpected": sorted(report.unexpected),
                                "mismatched": sorted(report.mismatched)}

    origin = f"Converted for RelZoo from `{config['source']}` with the `{cmap.name}` map (version {cmap.version})."
    card = model_card(name, config, origin, extra_tags=[f"converter:{cmap.name}"])
    write_model_folder(out_dir, state, config, card, metadata={"converter": cmap.name})
    logger.info("converted %s with map '%s' into %s", path, cmap.name, out_dir)
    return out_dir
