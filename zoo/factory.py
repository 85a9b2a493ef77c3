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

import collections.abc
import difflib
import inspect
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from zoo import weights as weights_lib
from zoo._fs import sha256_file, utf8_text
from zoo.checkpoint import compare_state_dicts, load_checkpoint, load_into
from zoo.config import KWARG_LIMITS, ModelConfig, PretrainedCfg, ReportedMetric, WeightsEntry, check_file_kwargs
from zoo.convert import ConversionMap, convert_state_dict, load_map
from zoo.data.labels import label_names
from zoo.detect import best_fit_hint, detect, model_signature
from zoo.errors import (ArgumentError, CheckpointError, ConfigError, ConversionError, UnknownModelError, WeightsError,
                        ZooError)
from zoo.hub import DOWNLOADING_KWARGS, FOLDER_CONFIG, check_out_dir, jsonable, model_card, write_model_folder
from zoo.models._features import FeatureListNet
from zoo.registry import model_constructor, model_info, split_name

logger = logging.getLogger(__name__)

__all__ = ["create_model", "from_pretrained", "convert_checkpoint", "adapt_input_conv"]


def _weights_request(cfg: ModelConfig, tag: Optional[str], pretrained: bool,
                     weights: Union[str, Path, None]) -> Optional[WeightsEntry]:
    """Turn ``pretrained``/``weights``/``name.tag`` into one weights entry, or None for random init."""
    if weights is not None:
        weights = str(weights)
        if weights in cfg.weights:
            return cfg.weights[weights]
        source = weights_lib.parse_source(weights)
        if source.kind == "local" and not source.path.exists() and difflib.get_close_matches(weights, list(cfg.weights)):
            raise WeightsError(f"model '{cfg.name}' has no weights tagged '{weights}'{cfg.tag_hint(weights)} "
                               f"(and there is no file or folder '{weights}')")
        return WeightsEntry(tag=USER_WEIGHTS, source=weights)
    if pretrained or tag:
        return cfg.weights_entry(tag)
    return None


def _original_checkpoint(base: str, entry: WeightsEntry, converter: Optional[ConversionMap], ema: bool,
                         kwargs: dict, overrides: dict) -> tuple[Optional[ConversionMap], dict, Any]:
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
    kwargs = check_kwargs_from_file(base, found.kwargs, f"{path}: the architecture it records", CheckpointError)
    return found.map, kwargs, checkpoint


def create_model(name: str, pretrained: bool = False, weights: Union[str, Path, None] = None, *,
                 converter: Union[str, ConversionMap, None] = None, ema: bool = False, trust_map: bool = False,
                 allow_nonfinite: bool = False, **overrides) -> nn.Module:
    """Build a registered model, optionally with weights, like ``timm.create_model``.

    Args:
        name: a registered name, optionally ``name.tag`` to pick a weights entry.
        pretrained: load the tag's (or the default) weights entry of the config.
        weights: a weights tag, a local file or RelZoo folder, an https URL or
            ``hf://org/repo[@rev]/file``. Overrides ``pretrained``. An original project's training
            checkpoint is recognised (:func:`zoo.detect.detect`: which map converts it into this model,
            with the constructor kwargs it records) and converted once into the cache.
        converter: the conversion map (a name in ``convert/``, a map file or a ConversionMap) of an
            original checkpoint, instead of recognising it.
        trust_map: ``converter`` is a map file from outside the package whose hooks may run any
            function (a map is code; :func:`zoo.convert.load_map`).
        ema: load the checkpoint's EMA weights (``model_ema``) instead of its main ones.
        **overrides: constructor kwargs, applied over the config's kwargs (and over the
            kwargs recorded in a RelZoo folder's ``config.json`` or read off an original checkpoint).
            With weights, timm's rules:

            - ``num_classes=N``: every tensor is loaded except the classifier's, which keeps its new
              initialisation (the dropped keys are named once in a warning); 0 = no classifier, the
              model returns pooled features. Detectors: DETR's class embedding, the box predictor.
            - ``in_chans=N``: the first convolution's RGB weights are adapted
              (:func:`adapt_input_conv`).
            - ``features_only=True`` (with ``out_indices``): a backbone returning feature maps
              (:class:`zoo.models._features.FeatureListNet`, ``model.feature_info``).

            Every other key is loaded strictly.

        allow_nonfinite: load weights that hold NaN or inf (by default an error naming the tensors).

    The kwargs a RelZoo folder's ``config.json`` records are a file's, not the caller's: they are
    checked against the constructor (names, types) and bounded (:data:`zoo.config.KWARG_LIMITS`, and
    the built model's size) before anything is allocated.

    Returns the model, with ``model.pretrained_cfg`` (:class:`~zoo.config.PretrainedCfg`; also
    ``model.default_cfg``); in eval mode when weights were loaded, else as constructed.
    """
    base, tag = split_name(name)
    constructor = model_constructor(base)
    cfg = model_info(base)
    entry = _weights_request(cfg, tag, pretrained, weights)

    kwargs = dict(cfg.kwargs)
    checkpoint = None
    if converter is not None and not isinstance(converter, ConversionMap):
        converter = load_map(converter, trust_map=trust_map)
    recorded = weights_lib.read_folder_config(entry.source) if entry is not None else None
    if recorded and ((ema and not recorded.get("ema")) or converter is not None):
        # a RelZoo folder holds one converted state dict: no EMA copy or original layout is left in it
        raise ConfigError(f"{entry.source} is a converted RelZoo folder: converter= and ema=True apply to original "
                          "checkpoints only (`zoo convert --ema` converts the EMA weights)")
    if recorded and recorded.get("model") not in (None, base):
        recorded = None  # another model's folder: the strict load says what does not fit
    elif recorded is None and entry is not None and entry.converter is None:  # a user's file: maybe an original
        # checkpoint; the weights are matched as saved, so a new head or input is left to _fit_state_dict
        as_saved = {k: v for k, v in overrides.items() if k not in _NEW_HEAD_OR_INPUT + _FEATURE_OPTIONS}
        converter, found_kwargs, checkpoint = _original_checkpoint(base, entry, converter, ema,
                                                                   {**kwargs, **as_saved}, as_saved)
        kwargs.update(found_kwargs)
    if recorded:
        kwargs.update(check_kwargs_from_file(base, recorded.get("kwargs") or {}, f"{entry.source}: {FOLDER_CONFIG}",
                                             WeightsError))
    if entry is not None:
        converter = converter or entry.converter
    weights_num_classes = kwargs.get("num_classes")
    kwargs.update(overrides)
    options = {key: kwargs.pop(key) for key in _FEATURE_OPTIONS if key in kwargs}
    model = _construct(base, constructor, kwargs)
    if entry is not None:
        state_dict = weights_lib.load_state_dict(entry.source, sha256=entry.sha256, converter=converter,
                                                 model=model, ema=ema, checkpoint=checkpoint)
    if options.get("features_only"):
        model = FeatureListNet(model, options.get("out_indices"))
    if entry is not None:
        state_dict = _fit_state_dict(model, state_dict, new_head="num_classes" in overrides,
                                     new_input="in_chans" in overrides)
        load_into(model, state_dict, strict=True, allow_nonfinite=allow_nonfinite)
        model.eval()
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(cfg, entry, recorded, {**kwargs, **options},
                                                               weights_num_classes)
    return model


def from_pretrained(source: Union[str, Path], **overrides) -> nn.Module:
    """Rebuild a model from a RelZoo folder alone: ``zoo.from_pretrained("hf://org/repo[@rev]")`` or
    ``zoo.from_pretrained(DIR)`` (what :func:`zoo.save_pretrained` / ``zoo.push_to_hub`` wrote).

    ``config.json`` names the model and its kwargs, ``model.safetensors`` holds the weights (loaded
    strictly); ``overrides`` are :func:`create_model`'s (e.g. ``num_classes=5`` for a new head).
    """
    src = weights_lib.parse_source(source)
    if src.kind == "url" or (src.kind == "hf" and src.filename is not None):
        raise WeightsError(f"from_pretrained needs a folder (a local RelZoo folder or hf://org/repo[@rev]), got "
                           f"'{src}'; for a single file use create_model(NAME, weights='{src}')")
    if src.kind == "local" and not src.path.is_dir():
        raise WeightsError(f"from_pretrained: '{src}' is not a folder (looked at {src.path})")
    recorded = weights_lib.read_folder_config(src)
    if not recorded or not recorded.get("model"):
        raise WeightsError(f"from_pretrained: '{src}' has no {FOLDER_CONFIG} naming its model; write the folder "
                           f"with zoo.save_pretrained(model, DIR) or `python -m zoo export NAME --out DIR`")
    return create_model(str(recorded["model"]), weights=str(source), **overrides)


USER_WEIGHTS = "user"  # the tag of a weights source given by the caller rather than by the config
_FEATURE_OPTIONS = ("features_only", "out_indices")  # create_model's, not the constructor's
_NEW_HEAD_OR_INPUT = ("num_classes", "in_chans")  # overrides that change the weights' shapes (_fit_state_dict)


def _pretrained_cfg(cfg: ModelConfig, entry: Optional[WeightsEntry], recorded: Optional[dict], kwargs: dict,
                    weights_num_classes: Optional[int]) -> PretrainedCfg:
    """``model.pretrained_cfg``: the config, the weights entry, and what a RelZoo folder recorded
    (:func:`zoo.hub.save_pretrained`'s ``pretrained_cfg``: label names, preprocessing, reported rows)."""
    saved = (recorded or {}).get("pretrained_cfg") or {}
    try:
        names = saved["label_names"] if "label_names" in saved else (entry.label_names if entry else None)
        pretrained = PretrainedCfg.build(cfg, entry, model_kwargs=kwargs, label_names=label_names(names),
                                         preprocessing=saved.get("preprocessing"))
        if entry is not None and entry.tag == USER_WEIGHTS:  # a file or folder of the caller's
            pretrained = pretrained.replace(
                tag=saved.get("tag"), sha256=saved.get("sha256"), license=saved.get("license", pretrained.license),
                reported=tuple(ReportedMetric(**row) for row in saved["reported"]) if "reported" in saved
                else pretrained.reported)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a hand-edited or hostile config.json
        if isinstance(exc, ZooError):
            raise
        raise WeightsError(f"{entry.source if entry else cfg.name}: {FOLDER_CONFIG}: field 'pretrained_cfg' is "
                           f"malformed ({type(exc).__name__}: {exc})") from exc
    if kwargs.get("features_only"):
        pretrained = pretrained.replace(num_classes=None, label_names=None)
    elif entry is not None and kwargs.get("num_classes") != weights_num_classes:
        pretrained = pretrained.replace(label_names=None, reported=())  # a new head: not the weights' classes
    return pretrained


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """RGB weights of a first convolution ``(O, 3, *kernel)`` for ``in_chans`` inputs, timm's rule: summed
    over R, G, B for 1 channel; else repeated over the channels and scaled by 3 / ``in_chans``."""
    if weight.shape[1] != 3:
        raise ConversionError(f"adapting a first convolution needs RGB weights (O, 3, ...), got {tuple(weight.shape)}")
    dtype, weight = weight.dtype, weight.float()
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = [1, math.ceil(in_chans / 3)] + [1] * (weight.dim() - 2)
        adapted = weight.repeat(*repeats)[:, :in_chans] * (3 / in_chans)
    return adapted.to(dtype)


def _fit_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, new_head: bool,
                    new_input: bool) -> dict[str, Tensor]:
    """Weights of the model as built -> weights for ``model`` as asked for: a backbone's keys under
    ``model.`` without the head, a first convolution adapted to ``in_chans``, no classifier keys for
    a new ``num_classes``. Anything else that does not fit is left for the strict load to report."""
    target = model.state_dict()
    state = dict(state_dict)
    if isinstance(model, FeatureListNet) and not any(key.startswith("model.") for key in state):
        state = {f"model.{key}": value for key, value in state.items()}
        head = [key for key in state if key.startswith(model.pruned)]
        for key in head:
            del state[key]
        if head:
            logger.info("features_only: left out %d keys of the head (%s)", len(head), ", ".join(model.pruned))
    if new_input:
        for key, value in list(state.items()):
            want = target.get(key)
            if (want is not None and want.shape != value.shape and value.dim() > 2 and value.shape[1] == 3
                    and want.shape[:1] + want.shape[2:] == value.shape[:1] + value.shape[2:]):
                state[key] = adapt_input_conv(want.shape[1], value)
                logger.info("in_chans=%d: adapted %s from 3 input channels", want.shape[1], key)
    classifier = _classifier_prefix(model)
    if new_head and classifier is not None:
        dropped = [key for key, value in state.items() if key.startswith(classifier)
                   and (key not in target or target[key].shape != value.shape)]
        if dropped:
            what = ("num_classes=0: the model has no classifier" if getattr(model, "num_classes", None) == 0
                    else "new num_classes: the classifier is re-initialised")
            logger.warning("%s; left out of the weights: %s", what,
                           ", ".join(f"{key} {list(state[key].shape)}" for key in dropped))
        for key in dropped:
            del state[key]
        # the new classifier keeps its initialisation
        state.update({key: value for key, value in target.items() if key.startswith(classifier) and key not in state})
    return state


def _classifier_prefix(model: nn.Module) -> Optional[str]:
    """State-dict prefix of the model's classifier (``fc.``, ``roi_heads.box_predictor.``), None without one."""
    if not hasattr(model, "get_classifier"):
        return None
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return f"{name}."
    return None


def convert_checkpoint(src: str | os.PathLike, from_map: str | ConversionMap | None = None,
                       out_dir: str | os.PathLike | None = None, model_name: str | None = None,
                       model_kwargs: dict | None = None, strict: bool = True, *, model: nn.Module | None = None,
                       source: str | None = None, ema: bool = False, trust_map: bool = False,
                       allow_nonfinite: bool = False) -> Path:
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
    ``trust_map``: ``from_map`` is a map file from outside the package whose hooks may be any function
    (:func:`zoo.convert.load_map`). ``allow_nonfinite``: convert weights that hold NaN or inf.
    """
    if out_dir is None:
        raise TypeError("convert_checkpoint() needs out_dir, the folder to write")
    cmap = (from_map if from_map is None or isinstance(from_map, ConversionMap)
            else load_map(from_map, trust_map=trust_map))
    parsed = weights_lib.parse_source(src)
    source = utf8_text(source or (str(parsed.path) if parsed.kind == "local" else parsed.text))
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
        if not name:
            raise ConfigError(f"conversion map '{cmap.name}' has no target_model; pass model_name (--model NAME)")
        check_kwargs_from_file(name, {k: v for k, v in kwargs.items() if k not in (model_kwargs or {})},
                               f"{path}: the architecture it records", CheckpointError)
        model = create_model(name, **kwargs)
    name = name or type(model).__name__

    state = convert_state_dict(checkpoint, cmap, model.state_dict(), ema=ema)
    try:
        report = load_into(model, state, strict=strict, allow_nonfinite=allow_nonfinite)
    except ConversionError as exc:
        raise ConversionError(f"{exc}\nconverted with map '{cmap.name}' into {name}"
                              f"{best_fit_hint(checkpoint, name, ema=ema)}") from None
    if report:
        state = report.fitting(state)

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
        if report.wrong_dtype:
            config["incomplete"]["wrong_dtype"] = sorted(report.wrong_dtype)

    origin = f"Converted for RelZoo from `{config['source']}` with the `{cmap.name}` map (version {cmap.version})."
    card = model_card(name, config, origin, extra_tags=[f"converter:{cmap.name}"])
    write_model_folder(out_dir, state, config, card, metadata={"converter": cmap.name})
    logger.info("converted %s with map '%s' into %s", path, cmap.name, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Constructor kwargs from files: checked against the constructor and bounded before a model is built
# --------------------------------------------------------------------------------------------

#: The most elements (parameters and buffers) a model built from a file's kwargs may have: 2^31,
#: 8 GiB of float32, 25 times RelZoo's largest model.
MAX_MODEL_ELEMENTS = 1 << 31


def _construct(name: str, constructor: Callable[..., nn.Module], kwargs: dict) -> nn.Module:
    """``constructor(**kwargs)``, what it refuses as the project's errors: an unknown or mistyped kwarg an
    ArgumentError (also a TypeError), a value it rejects a ConfigError (also a ValueError); the cause chained."""
    try:
        return constructor(**kwargs)
    except ConfigError as exc:  # the constructor's own complaint (ArgumentError too), named after the model
        if str(exc).startswith(f"{name}:"):
            raise
        raise type(exc)(f"{name}: {exc}") from exc
    except ZooError:
        raise
    except TypeError as exc:
        raise ArgumentError(f"{name}: {exc}") from exc
    except (ValueError, RuntimeError, ArithmeticError, KeyError, IndexError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def check_kwargs_from_file(name: str, kwargs: Any, where: str, error: type[Exception] = ConfigError) -> dict:
    """``kwargs`` that a file (a RelZoo folder's config.json, a checkpoint's recorded architecture) gives
    model ``name``, checked before the model is built: bounded values (:func:`zoo.config.check_file_kwargs`),
    the types the constructor declares (or the config's kwargs hold), and the size of the model they build,
    found by building it on the meta device (no memory) and bounded by :data:`MAX_MODEL_ELEMENTS`.

    Raises ``error`` naming ``where`` and the key (or the size and the bound). Returns the kwargs."""
    kwargs = check_file_kwargs(kwargs, where, error)
    try:
        cfg, constructor = model_info(name), model_constructor(name)
    except UnknownModelError:  # nothing to check against: building it is the error the caller gets
        return kwargs
    expected = _declared_types(constructor)
    for key, value in kwargs.items():
        annotation = expected.get(key) if key not in _FEATURE_OPTIONS else None
        if annotation is None and key in cfg.kwargs and cfg.kwargs[key] is not None:
            annotation = _json_type(key, cfg.kwargs[key])
        if annotation is not None and not _accepts(annotation, value):
            raise error(f"{where}: kwarg '{key}' = {value!r} ({type(value).__name__}) is not what {name} takes "
                        f"({_type_name(annotation)})")
    built = {key: value for key, value in {**cfg.kwargs, **kwargs}.items() if key not in _FEATURE_OPTIONS}
    built.update({key: False for key in DOWNLOADING_KWARGS if built.get(key)})  # sizes only: nothing is fetched
    try:
        with torch.device("meta"):
            model = constructor(**built)
    except ZooError as exc:
        raise error(f"{where}: kwargs {sorted(kwargs)} do not build {name}: {exc}") from exc
    except Exception as exc:  # an unknown kwarg (TypeError), a value the constructor refuses (ValueError), ...
        raise error(f"{where}: kwargs {sorted(kwargs)} do not build {name} ({type(exc).__name__}: {exc})") from exc
    elements = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    if elements > MAX_MODEL_ELEMENTS:
        raise error(f"{where}: kwargs {dict(kwargs)} build {name} with {elements:,} parameters and buffers, over "
                    f"the bound of {MAX_MODEL_ELEMENTS:,} (zoo.factory.MAX_MODEL_ELEMENTS) on a model a file describes")
    return kwargs


def _declared_types(constructor: Callable) -> dict[str, Any]:
    """Parameter name -> annotation, of the registered function and, when it passes ``**kwargs`` on to the
    class it returns, of that class's ``__init__``. Annotations that cannot be resolved are left out."""
    found: dict[str, Any] = {}
    functions = [constructor]
    try:
        returned = typing.get_type_hints(constructor).get("return")
    except Exception:  # an annotation naming something not importable at run time
        returned = None
    takes_more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(constructor).parameters.values())
    if takes_more and isinstance(returned, type) and returned is not nn.Module:
        functions.append(returned.__init__)
    for fn in reversed(functions):  # the registered function's own parameters win
        try:
            found.update({k: v for k, v in typing.get_type_hints(fn).items() if k != "return"})
        except Exception:
            continue
    return found


def _json_type(key: str, default: Any) -> type:
    """The type a kwarg must have, from its value in the model's config: a size is an int, another number any number."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return int if key in KWARG_LIMITS else float
    return list if isinstance(default, (list, tuple)) else type(default)


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a JSON-like ``value`` is of the ``annotation``'s type; annotations of other kinds accept anything."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and (len(args) != 1 or all(_accepts(args[0], v) for v in value))
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
