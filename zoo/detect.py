"""Which registered model, and which conversion map, an original checkpoint belongs to.

:func:`detect` answers it for ``zoo convert`` and ``create_model(name, weights=<original checkpoint>)``
(:mod:`zoo.factory`), in this order:

1. **What the checkpoint records.** A map's ``model_name`` hook reads the model the training run named
   (DeiT's ``args.model``, leaderj1001's ``arch``), its ``model_kwargs`` hook the architecture
   (DETR's ``args``, class counts read off the head). A recorded model that fits is the answer.
2. **The key/shape signature.** Otherwise every registered model of the map's family is built on the
   meta device (no memory, no initialisation; cached per process) and the converted state dict is
   compared with its keys and shapes. A single model that fits is the answer; among several, the
   map's ``target_model``; several different architectures that all fit are a true ambiguity, and the
   error lists them (``--model`` picks one).

Nothing fits: the error names the registered model whose signature fits best, with what does not fit.
Maps with ``auto_detect: false`` (variant readings such as ``rsa-internal-swapped``) and maps without a
``target_model`` (``torchvision-resnet``, for backbones) take part only when named explicitly.

This module reads the registry and the maps; it builds no real model and loads no weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from zoo.checkpoint import LoadReport, compare_state_dicts
from zoo.convert import ConversionMap, convert_state_dict, ema_weights, list_maps, load_map
from zoo.errors import ConfigError, ConversionError
from zoo.registry import list_models, model_constructor, model_info

logger = logging.getLogger(__name__)

__all__ = ["Detection", "detect", "best_fit_hint", "model_signature", "auto_maps"]


@dataclass
class Detection:
    """A (model, map) pair for a checkpoint and how well it fits.

    ``kwargs``: constructor kwargs over the config's (the map's ``model_kwargs`` hook read off the
    checkpoint, then the caller's): ``create_model(model, **kwargs)`` builds the target. ``how``:
    ``'given'`` (the caller named the model), ``'recorded'`` (the checkpoint names it) or ``'signature'``
    (only its keys and shapes fit). ``report``: the comparison of the converted state dict with the
    model's (empty when it fits); ``problem``: why the map could not convert it at all.
    """

    model: str
    converter: str
    kwargs: dict
    how: str
    report: LoadReport = field(default_factory=LoadReport)
    problem: Optional[str] = None
    agreeing: int = 0  # keys present in both with the same shape
    map: Optional[ConversionMap] = field(default=None, repr=False, compare=False)  # the map named by ``converter``

    @property
    def fits(self) -> bool:
        return self.problem is None and self.report.ok

    @property
    def total(self) -> int:
        """Keys of model and checkpoint together."""
        r = self.report
        return self.agreeing + len(r.missing) + len(r.unexpected) + len(r.mismatched)

    @property
    def score(self) -> float:
        """Share of the keys of model and checkpoint together that agree in name and shape (1.0: it fits)."""
        return 0.0 if self.problem is not None or self.total == 0 else self.agreeing / self.total

    def describe(self) -> str:
        return f"{self.model} (--model {self.model} --from {self.converter})"

    def explain(self, limit: int = 12) -> str:
        return self.problem if self.problem is not None else self.report.format(limit=limit)


# --------------------------------------------------------------------------------------------
# Signatures on the meta device
# --------------------------------------------------------------------------------------------

_SIGNATURES: dict[tuple[str, str], dict[str, Tensor] | Exception] = {}


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip ``torch.nn.init``'s in-place initialisers (on meta tensors they only cost time), as
    huggingface's ``no_init_weights`` does; the shapes a constructor creates are unchanged."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def model_signature(name: str, kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict of ``name`` built with ``kwargs``, as meta tensors (key, shape, dtype; no data).

    Built once per (name, kwargs) and process; raises what the constructor raises for bad kwargs.
    """
    key = (name, json.dumps(kwargs, sort_keys=True, default=repr))
    if key not in _SIGNATURES:
        constructor = model_constructor(name)
        try:
            with _no_init(), torch.device("meta"):
                _SIGNATURES[key] = constructor(**kwargs).state_dict()
        except (TypeError, ValueError, ConfigError) as exc:  # kwargs of another architecture: remembered too
            _SIGNATURES[key] = exc
    if isinstance(_SIGNATURES[key], Exception):
        raise _SIGNATURES[key]
    return _SIGNATURES[key]


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------

def auto_maps() -> list[ConversionMap]:
    """The maps auto-detection tries: those with a ``target_model`` and ``auto_detect`` left on."""
    maps = [load_map(name) for name in list_maps()]
    return [m for m in maps if m.target_model and m.auto_detect]


def _family_models(cmap: ConversionMap) -> list[str]:
    family = model_info(cmap.target_model).family
    return [name for name in list_models() if model_info(name).family == family]


def _hook_value(cmap: ConversionMap, which: str, checkpoint: Any, default):
    hook = cmap.hook(which)
    if hook is None:
        return default
    value = hook(checkpoint)
    return default if value is None else value


def _try(checkpoint: Any, cmap: ConversionMap, name: str, kwargs: dict, how: str, ema: bool) -> Optional[Detection]:
    """The detection of ``name`` (built with ``kwargs`` over its config's) through ``cmap``, or None when the
    model cannot be built with these kwargs."""
    try:
        target = model_signature(name, {**model_info(name).kwargs, **kwargs})
    except (TypeError, ValueError, ConfigError) as exc:  # kwargs of another architecture
        logger.debug("detect: %s(%s) not built: %s", name, kwargs, exc)
        return None
    try:
        state = convert_state_dict(checkpoint, cmap, target, ema=ema)
    except ConversionError as exc:  # e.g. an RGA-S checkpoint against an RGA-SC target
        return Detection(name, cmap.name, kwargs, how, problem=str(exc), map=cmap)
    report = compare_state_dicts(state, target, target_name=name)
    return Detection(name, cmap.name, kwargs, how, report, agreeing=len(set(state) & set(target)) - len(report.mismatched),
                     map=cmap)


def _candidates(checkpoint: Any, cmap: ConversionMap, model_name: Optional[str], model_kwargs: Mapping,
                ema: bool, recorded_only: bool = False) -> list[Detection]:
    """The models this map may convert the checkpoint into, each with its fit: ``model_name``, else the model
    the checkpoint records, else every model of the map's family (none with ``recorded_only``)."""
    try:
        hook_kwargs = dict(_hook_value(cmap, "model_kwargs", checkpoint, {}))
        recorded = _hook_value(cmap, "model_name", checkpoint, None)
    except ConversionError as exc:  # what the checkpoint records is not something this map converts
        return [Detection(model_name or cmap.target_model, cmap.name, {}, "signature", problem=str(exc), map=cmap)]
    if recorded is not None and recorded not in list_models():
        logger.warning("the checkpoint names the model '%s', which is not registered; matching by shapes", recorded)
        recorded = None
    if model_name is not None:
        names, how = [model_name], "given"
    elif recorded is not None:
        names, how = [recorded], "recorded"
    else:
        names, how = ([] if recorded_only else _family_models(cmap)), "signature"
    found = [_try(checkpoint, cmap, name, {**hook_kwargs, **model_kwargs}, how, ema) for name in names]
    return [d for d in found if d is not None]


def _same_kind(detection: Detection) -> bool:
    """The model is built by the same code as its map's target (a DeiT through the DeiT map, not the DETR one)."""
    target = detection.map.target_model
    return model_constructor(detection.model).__module__ == model_constructor(target).__module__


def _choose(fits: list[Detection]) -> Detection:
    """One detection among several that fit: a given or recorded one, else the map's target, else the only
    model (through the map made for its kind), else an error listing the candidates."""
    fits = sorted(fits, key=lambda d: not _same_kind(d))  # stable: the maps' order otherwise
    for how in ("given", "recorded"):
        named = [d for d in fits if d.how == how]
        if len({d.model for d in named}) == 1:
            return named[0]
    targets = [d for d in fits if d.model == d.map.target_model]
    if len({d.model for d in targets}) == 1:
        return targets[0]
    if len({d.model for d in fits}) == 1:
        return fits[0]
    listed = "; ".join(sorted({f"--model {d.model} --from {d.converter}" for d in fits}))
    raise ConversionError(f"the checkpoint fits {len({d.model for d in fits})} registered models equally well "
                          f"(same keys and shapes, different architectures); choose one: {listed}")


def _maps(from_map: str | ConversionMap | None) -> list[ConversionMap]:
    if from_map is None:
        return auto_maps()
    return [from_map if isinstance(from_map, ConversionMap) else load_map(from_map)]


def _all_candidates(checkpoint: Any, maps: Sequence[ConversionMap], model_name: Optional[str],
                    model_kwargs: Optional[Mapping], ema: bool) -> list[Detection]:
    return [d for cmap in maps for d in _candidates(checkpoint, cmap, model_name, dict(model_kwargs or {}), ema)]


def detect(checkpoint: Any, from_map: str | ConversionMap | None = None, model_name: Optional[str] = None,
           model_kwargs: Optional[Mapping] = None, *, ema: bool = False) -> Detection:
    """The registered model and conversion map for an original ``checkpoint`` (what
    :func:`zoo.checkpoint.load_checkpoint` returned).

    Args:
        from_map: the map to use (name or map); default: every auto-detected map (:func:`auto_maps`).
        model_name: the target model, when the caller knows it (its fit is still checked).
        model_kwargs: constructor kwargs over the config's and the checkpoint's.
        ema: match the checkpoint's EMA weights instead of its main ones.
    Returns the detection that fits (``create_model(d.model, **d.kwargs)`` builds the model, ``d.converter``
    converts the checkpoint).
    Raises ConversionError when several architectures fit (listing them) or none does (naming the
    registered model whose signature fits best and what differs); UnknownModelError for an unknown name.
    """
    if model_name is not None:
        model_info(model_name)  # UnknownModelError with suggestions
    if ema:
        ema_weights(checkpoint)  # a checkpoint without EMA weights fails here, saying so
    maps = _maps(from_map)
    if model_name is not None and from_map is None:  # only the maps of the model's family
        family = model_info(model_name).family
        maps = [m for m in maps if model_info(m.target_model).family == family] or maps
    if model_name is None:  # a model the checkpoint records and fits needs no search by signature
        recorded = [d for cmap in maps for d in _candidates(checkpoint, cmap, None, dict(model_kwargs or {}), ema,
                                                            recorded_only=True)]
        if any(d.fits for d in recorded):
            return _choose([d for d in recorded if d.fits])
    detections = _all_candidates(checkpoint, maps, model_name, model_kwargs, ema)
    fits = [d for d in detections if d.fits]
    if fits:
        return _choose(fits)
    if model_name is None:
        raise ConversionError(_nothing_fits(checkpoint, detections, one_map=from_map is not None))
    given = max(detections, key=lambda d: d.score, default=None)
    report = given.explain() if given is not None else f"{model_name} cannot be built with these kwargs"
    raise ConversionError(f"the checkpoint does not fit {model_name}{best_fit_hint(checkpoint, model_name, ema=ema)}"
                          f"\n{report}")


def _nothing_fits(checkpoint: Any, detections: Sequence[Detection], one_map: bool = False) -> str:
    best = max(detections, key=lambda d: d.score, default=None)
    problems = sorted({d.problem for d in detections if d.problem})
    if one_map and problems and (best is None or best.score == 0):  # the map the caller named refused it: why
        return "the checkpoint cannot be converted: " + "; ".join(problems[:3])
    if best is None or best.score == 0:
        keys = ", ".join(map(str, list(checkpoint)[:12])) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        return (f"no registered model shares the key names of this checkpoint (top-level: {keys}); "
                f"name the map and model with --from ({', '.join(list_maps())}) and --model")
    return (f"no registered model fits this checkpoint; the closest is {best.describe()} "
            f"({best.agreeing} of {best.total} keys agree):\n{best.explain()}")


def best_fit_hint(checkpoint: Any, model_name: Optional[str] = None, *, ema: bool = False) -> str:
    """``'; the registered model whose signature fits it is X (--model X --from M)'`` (or the closest one, when
    none fits) for the error of a strict load into ``model_name`` that failed; '' when there is nothing to add."""
    detections = _all_candidates(checkpoint, auto_maps(), None, None, ema)
    try:
        found = _choose([d for d in detections if d.fits]) if any(d.fits for d in detections) else None
    except ConversionError as exc:  # several fit
        return f"; {exc}"
    if found is None:
        closest = max(detections, key=lambda d: d.score, default=None)
        if closest is None or closest.score == 0 or closest.model == model_name:
            return ""
        return (f"; no registered model fits it, the closest is {closest.describe()} "
                f"({closest.agreeing} of {closest.total} keys agree)")
    if found.model == model_name:
        return f"; it fits {found.describe()} (map and kwargs as detected: {found.kwargs})"
    return f"; the registered model whose signature fits it is {found.describe()}"
