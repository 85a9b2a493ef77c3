"""Conversion maps: how an original codebase's checkpoints map onto RelZoo's key names.

A :class:`ConversionMap` is one ``convert/<name>.yaml``, validated on load (:func:`load_map`).
:func:`convert_state_dict` applies it to a checkpoint that :func:`zoo.checkpoint.load_checkpoint`
read: unwrap the container, strip prefixes, regex renames, drops, named tensor transforms, an
optional Python hook, then ``num_batches_tracked`` handling against the target state dict.

Reading files and strict loading live one floor down, in :mod:`zoo.checkpoint` (re-exported here
for code that imports them from ``zoo.convert``); converting a checkpoint file into a RelZoo folder
(fetch, build the target model, convert, write) is :func:`zoo.factory.convert_checkpoint`.

A map file, field by field (all but ``name`` optional)::

    name: rga                          # must equal the file stem
    description: free text
    version: 1                         # bump when the map's output changes: part of the cache key
    target_model: rga_sc_resnet50      # the family's default target; null = caller gives it (no auto-detection)
    auto_detect: true                  # false: a variant map that only an explicit --from selects
    container: [state_dict, model]     # keys tried in order to find the weights in a dict container
    strip_prefixes: ["module."]        # each stripped once, in order, where a key starts with it
    renames: [['^E_conv\\.', 'H1.']]   # re.sub(pattern, replacement, key), in order
    drops: ['^fc\\.']                  # re.search patterns: matching keys are removed
    drop_if_absent: ['^fc\\.']         # removed only when the target state dict has no such key
    transforms: [{match: '\\.weight$', op: unsqueeze_temporal}]   # see TRANSFORMS
    num_batches_tracked: fill          # fill | keep | drop
    hooks: {state_dict: 'zoo.models.x:f', model_kwargs: 'zoo.models.x:g', model_name: 'zoo.models.x:h'}

Hooks: ``state_dict(state_dict, checkpoint, target_state_dict) -> state_dict`` (a last step of the
conversion), ``model_kwargs(checkpoint) -> dict`` (constructor kwargs the checkpoint records, e.g. DETR's
``args``) and ``model_name(checkpoint) -> str | None`` (the registered model the checkpoint names, e.g.
DeiT's ``args.model``). Which map and model fit a checkpoint is :mod:`zoo.detect`.

A map is code, not data, wherever it names hooks. The packaged maps' hooks are an explicit registry,
:data:`HOOKS`: a model file decorates its hook functions with :func:`register_hook` (named
``module:function``, as the maps spell them), and a hook that is not registered is refused. A map
from outside the package (``load_map(path)``, ``--from my.yaml``) may name other functions only with
``trust_map=True`` (``--trust-map``): until then none of its hooks is imported. Every hook's call is
guarded: an exception it raises on a hostile checkpoint is a :class:`~zoo.errors.ConversionError`
(the cause chained), and the kwargs a ``model_kwargs`` hook reads off a checkpoint are bounded
(:func:`zoo.config.check_file_kwargs`) before any model is built with them.

Exponential-moving-average weights (``model_ema``, timm's ``state_dict_ema``) replace the container's
weights with ``convert_state_dict(..., ema=True)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from zoo.checkpoint import (NUM_BATCHES_TRACKED, PICKLE_SUFFIXES, LoadReport, allowed_globals,  # noqa: F401
                            compare_state_dicts, load_checkpoint, load_into, save_safetensors,
                            state_dict_signature)
from zoo.config import check_file_kwargs
from zoo.errors import CheckpointError, ConfigError, ConversionError, ZooError
from zoo.paths import convert_dir, progress_bar

__all__ = [
    "EMA_KEYS", "HOOKS", "TRANSFORMS", "ConversionMap", "Transform", "convert_state_dict", "ema_weights", "list_maps",
    "load_map", "register_hook",
    "register_transform", "unwrap_container",
    # re-exported from zoo.checkpoint
    "LoadReport", "allowed_globals", "load_checkpoint", "load_into", "state_dict_signature",
]

# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {}


def register_transform(name: str) -> Callable[[Callable[[Tensor], Tensor]], Callable[[Tensor], Tensor]]:
    """Decorator adding a named tensor op usable in a map's ``transforms``: ``f(tensor) -> tensor``."""

    def decorator(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        if name in TRANSFORMS and TRANSFORMS[name] is not fn:
            raise ConfigError(f"transform '{name}' is already registered ({TRANSFORMS[name]!r})")
        TRANSFORMS[name] = fn
        return fn

    return decorator


@register_transform("unsqueeze_temporal")
def _unsqueeze_temporal(t: Tensor) -> Tensor:
    """Inflate a 2D conv weight (O, I, kh, kw) to a 3D one (O, I, 1, kh, kw); other ranks pass through.

    Passing other ranks through lets a map match ``\\.weight$`` without also hitting BN weights.
    """
    return t.unsqueeze(2) if t.dim() == 4 else t


@register_transform("squeeze_last")
def _squeeze_last(t: Tensor) -> Tensor:
    """(..., 1) -> (...), e.g. a Conv1d kernel of size 1 (O, I, 1) into a Linear weight (O, I)."""
    if t.dim() == 0 or t.shape[-1] != 1:
        raise ConversionError(f"squeeze_last needs a last dimension of size 1, got shape {list(t.shape)}")
    return t.squeeze(-1)


@register_transform("transpose_last2")
def _transpose_last2(t: Tensor) -> Tensor:
    """(..., a, b) -> (..., b, a), e.g. a Conv1D (in, out) weight into a Linear (out, in) one."""
    if t.dim() < 2:
        raise ConversionError(f"transpose_last2 needs at least 2 dimensions, got shape {list(t.shape)}")
    return t.transpose(-1, -2).contiguous()


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


#: The conversion hooks packaged maps may name: ``'module:function'`` -> the function.
HOOKS: dict[str, Callable] = {}
_HOOK_MODULES = "zoo.models."  # where packaged hooks live; only these modules are imported to find one


def register_hook(fn: Callable) -> Callable:
    """Decorator adding ``fn`` to :data:`HOOKS` under ``'<module>:<function>'`` (how a map's ``hooks`` names it)."""
    name = f"{fn.__module__}:{fn.__qualname__}"
    if name in HOOKS and HOOKS[name] is not fn:
        raise ConfigError(f"conversion hook '{name}' is already registered ({HOOKS[name]!r})")
    HOOKS[name] = fn
    return fn


def _registered_hook(spec: str) -> Callable | None:
    """The registered hook ``spec``, importing its module first when it is one of the model files."""
    if spec not in HOOKS:
        module_name = spec.partition(":")[0]
        if module_name.startswith(_HOOK_MODULES):
            try:
                importlib.import_module(module_name)
            except ImportError:
                return None
    return HOOKS.get(spec)


def _guarded(fn: Callable, which: str, spec: str, where: str) -> Callable:
    """``fn`` whose failures on a hostile checkpoint are ConversionErrors and whose result is checked."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except ZooError:
            raise
        except Exception as exc:  # a hook reading a checkpoint it was not written for
            raise ConversionError(f"{where}: the {which} hook {spec} failed on this checkpoint "
                                  f"({type(exc).__name__}: {exc})") from exc
        if which == "state_dict":
            if not isinstance(result, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, Tensor) for k, v in result.items()):
                raise ConversionError(f"{where}: the state_dict hook {spec} returned a {type(result).__name__}, "
                                      f"not a dict of tensors")
        elif which == "model_name":
            if result is not None and not isinstance(result, str):
                raise ConversionError(f"{where}: the model_name hook {spec} returned a {type(result).__name__}, "
                                      f"not a model name")
        elif which == "model_kwargs":
            result = check_file_kwargs(result or {}, f"{where}: kwargs read from the checkpoint by {spec}",
                                       error=CheckpointError)
        return result

    return call


@dataclass(frozen=True)
class Transform:
    """Apply ``TRANSFORMS[op]`` to every tensor whose (renamed) key matches ``match`` (re.search)."""

    match: str
    op: str


_NBT_MODES = ("fill", "keep", "drop")
_HOOK_NAMES = ("state_dict", "model_kwargs", "model_name")
#: Where training checkpoints keep EMA weights: DeiT's ``model_ema``, timm's train script's ``state_dict_ema``.
EMA_KEYS = ("model_ema", "state_dict_ema")


@dataclass
class ConversionMap:
    """One ``convert/<name>.yaml``: how an original codebase's checkpoints map onto ours (see module doc)."""

    name: str
    description: str = ""
    version: int = 1
    target_model: str | None = None
    auto_detect: bool = True
    container: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    drops: tuple[str, ...] = ()
    drop_if_absent: tuple[str, ...] = ()
    transforms: tuple[Transform, ...] = ()
    num_batches_tracked: str = "fill"
    hooks: dict[str, str] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # the file it came from (not a YAML field)
    trusted: bool = field(default=False, compare=False)  # its hooks may be any function (not a YAML field)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", *, trust_map: bool = False) -> ConversionMap:
        """Validate a parsed YAML mapping; every problem raises ConfigError naming ``source`` and the field.

        ``trust_map``: its hooks may name any importable function; otherwise only registered ones (:data:`HOOKS`)."""

        def fail(field_name: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field_name}': {problem}")

        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"path"}
        for key in data:
            if key not in known:
                raise fail(str(key), f"unknown field (known: {', '.join(sorted(known))})")
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise fail("name", "required, a non-empty string")

        def str_list(key: str) -> tuple[str, ...]:
            value = data.get(key) or []
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise fail(key, f"expected a list of strings, got {value!r}")
            return tuple(value)

        def regexes(key: str) -> tuple[str, ...]:
            patterns = str_list(key)
            for p in patterns:
                _compile(p, lambda problem: fail(key, problem))
            return patterns

        renames = []
        for i, pair in enumerate(data.get("renames") or []):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise fail(f"renames[{i}]", f"expected [pattern, replacement], got {pair!r}")
            _compile(pair[0], lambda problem, i=i: fail(f"renames[{i}]", problem))
            renames.append((pair[0], pair[1]))

        transforms = []
        for i, item in enumerate(data.get("transforms") or []):
            if not isinstance(item, Mapping) or set(item) != {"match", "op"} or not all(
                    isinstance(item[k], str) for k in ("match", "op")):
                raise fail(f"transforms[{i}]", f"expected {{match: regex, op: name}}, got {item!r}")
            _compile(item["match"], lambda problem, i=i: fail(f"transforms[{i}].match", problem))
            transforms.append(Transform(item["match"], item["op"]))

        nbt = data.get("num_batches_tracked", "fill")
        if nbt not in _NBT_MODES:
            raise fail("num_batches_tracked", f"expected one of {list(_NBT_MODES)}, got {nbt!r}")

        hooks = data.get("hooks") or {}
        if not isinstance(hooks, Mapping):
            raise fail("hooks", f"expected a mapping, got {hooks!r}")
        for key, target in hooks.items():
            if key not in _HOOK_NAMES:
                raise fail(f"hooks.{key}", f"unknown hook (known: {', '.join(_HOOK_NAMES)})")
            if not isinstance(target, str) or not re.fullmatch(r"[\w.]+:[\w.]+", target):
                raise fail(f"hooks.{key}", f"expected 'package.module:function', got {target!r}")

        version = data.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise fail("version", f"expected a positive integer, got {version!r}")
        target = data.get("target_model")
        if target is not None and not isinstance(target, str):
            raise fail("target_model", f"expected a registry name or null, got {target!r}")
        auto_detect = data.get("auto_detect", True)
        if not isinstance(auto_detect, bool):
            raise fail("auto_detect", f"expected true or false, got {auto_detect!r}")
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise fail("description", f"expected a string, got {description!r}")

        return cls(name=data["name"], description=description.strip(), version=version, target_model=target,
                   auto_detect=auto_detect, container=str_list("container"), strip_prefixes=str_list("strip_prefixes"),
                   renames=tuple(renames), drops=regexes("drops"), drop_if_absent=regexes("drop_if_absent"),
                   transforms=tuple(transforms), num_batches_tracked=nbt, hooks=dict(hooks), trusted=trust_map)

    def hook(self, which: str) -> Callable | None:
        """``hooks[which]`` (``'state_dict'``, ``'model_kwargs'`` or ``'model_name'``), guarded (see the module
        doc), or None.

        A registered hook (:data:`HOOKS`) always; any other function only for a trusted map
        (``trust_map=True``), imported only then. Anything else is a ConfigError saying why."""
        spec = self.hooks.get(which)
        if spec is None:
            return None
        where = str(self.path or self.name)
        fn = _registered_hook(spec)
        if fn is None and not self.trusted:
            if self.path is not None and self.path.parent == convert_dir():
                raise ConfigError(f"{where}: field 'hooks.{which}': {spec!r} is not a registered conversion hook "
                                  f"(decorate it with zoo.convert.register_hook)")
            raise ConfigError(f"{where}: field 'hooks.{which}' names {spec!r}, which is not one of RelZoo's registered "
                              f"hooks. A map from outside the package is code: it was not imported; pass "
                              f"--trust-map (trust_map=True) only if you trust the map and its hooks")
        if fn is None:
            module_name, _, attr = spec.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"{where}: field 'hooks.{which}': cannot import {spec!r} ({exc})") from exc
            if not callable(obj):
                raise ConfigError(f"{where}: field 'hooks.{which}': {spec!r} is not callable")
            fn = obj
        return _guarded(fn, which, spec, where)


def _compile(pattern: str, fail: Callable[[str], Exception]) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise fail(f"invalid regular expression {pattern!r}: {exc}") from None


def list_maps() -> list[str]:
    """Names of the maps in ``convert/`` (file stems), sorted."""
    folder = convert_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_map(name: str | os.PathLike, *, trust_map: bool = False) -> ConversionMap:
    """Load and validate ``convert/<name>.yaml`` (or a path to a map file).

    ``trust_map``: a map file from outside the package may name any function as a hook (a map is
    code); without it only registered hooks (:data:`HOOKS`) run. The packaged maps need no trust
    and never run an unregistered hook.

    Raises ConfigError for an unknown name (listing the known ones) or a malformed file (naming file and field).
    """
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        path = candidate
    else:
        path = convert_dir() / f"{name}.yaml"
        if not path.is_file():
            known = list_maps()
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown conversion map '{name}' (no {path}){hint} Known maps: {', '.join(known) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: cannot read the map ({exc})") from exc
    packaged = path.parent == convert_dir()
    cmap = ConversionMap.from_dict(data, source=str(path), trust_map=trust_map and not packaged)
    if packaged and cmap.name != path.stem:
        raise ConfigError(f"{path}: field 'name': '{cmap.name}' must equal the file stem '{path.stem}'")
    cmap.path = path
    return cmap




# --------------------------------------------------------------------------------------------
# Applying a map
# --------------------------------------------------------------------------------------------

def unwrap_container(checkpoint: Any, container: tuple[str, ...] | list[str] = ()) -> dict[str, Tensor]:
    """The state dict inside ``checkpoint``: the first ``container`` key present, or the checkpoint itself.

    Non-tensor entries (e.g. ``_metadata`` kept as a key by some tools) are not weights and are left out.
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors")
    obj: Any = checkpoint
    for key in container:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            obj = checkpoint[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(checkpoint)[:12]))
        raise ConversionError(f"no tensors found in the checkpoint (top-level keys: {keys}); "
                              f"the map's container keys {list(container)} were "
                              f"{'not found' if obj is checkpoint else 'found but empty'}")
    bad = [k for k in tensors if not isinstance(k, str)]
    if bad:
        raise ConversionError(f"state dict has non-string keys: {bad[:5]}")
    return dict(tensors)


def ema_weights(checkpoint: Any) -> dict[str, Tensor]:
    """The EMA state dict of a training checkpoint (:data:`EMA_KEYS`); ConversionError when it has none."""
    keys = list(checkpoint) if isinstance(checkpoint, Mapping) else []
    for key in EMA_KEYS:
        value = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
        if isinstance(value, Mapping) and any(isinstance(v, Tensor) for v in value.values()):
            return dict(value)
    present = [k for k in EMA_KEYS if k in keys]
    why = f"its {present[0]!r} is empty ({type(checkpoint[present[0]]).__name__})" if present else \
        f"none of {list(EMA_KEYS)} is among its top-level keys ({', '.join(map(str, keys[:12]))})"
    raise ConversionError(f"the checkpoint has no EMA weights: {why}; convert it without --ema / ema=True")


def convert_state_dict(checkpoint: Any, cmap: ConversionMap | str,
                       target_state_dict: Mapping[str, Tensor] | None = None, *, ema: bool = False) -> dict[str, Tensor]:
    """Map an original checkpoint's weights onto our key names.

    Steps, in order: unwrap ``cmap.container`` (with ``ema=True`` the EMA weights instead,
    :func:`ema_weights`); strip prefixes; renames; drops (and
    ``drop_if_absent`` keys the target lacks); transforms; the ``state_dict`` hook
    ``f(state_dict, checkpoint, target_state_dict) -> state_dict``; then ``num_batches_tracked``:
    ``fill`` adds an int64 zero scalar for each one the target has and the result lacks (where that
    norm layer's other entries are present) and removes those the target lacks; ``drop`` removes all;
    ``keep`` leaves them. Without a target only name-level steps apply.

    Returns a new dict; the tensors are shared with the checkpoint where no transform applied.
    Two source keys that end with the same name raise ConversionError naming both.
    """
    if isinstance(cmap, str):
        cmap = load_map(cmap)
    state = unwrap_container(ema_weights(checkpoint) if ema else checkpoint, cmap.container)

    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    renames = [(re.compile(p), r) for p, r in cmap.renames]
    drops = [re.compile(p) for p in cmap.drops]
    for key, tensor in progress_bar(state.items(), total=len(state), desc=f"convert ({cmap.name})", unit="tensor"):
        new = key
        for prefix in cmap.strip_prefixes:
            if new.startswith(prefix):
                new = new[len(prefix):]
        for pattern, replacement in renames:
            try:
                new = pattern.sub(replacement, new)
            except (re.error, IndexError) as exc:  # e.g. a replacement naming a group the pattern lacks
                raise ConfigError(f"{cmap.path or cmap.name}: field 'renames': [{pattern.pattern!r}, {replacement!r}] "
                                  f"cannot rename '{key}' ({exc})") from exc
        if any(p.search(new) for p in drops):
            continue
        if new in out:
            raise ConversionError(f"map '{cmap.name}' sends both '{origin[new]}' and '{key}' to '{new}'")
        out[new] = tensor
        origin[new] = key

    if target_state_dict is not None and cmap.drop_if_absent:
        optional = [re.compile(p) for p in cmap.drop_if_absent]
        out = {k: v for k, v in out.items() if k in target_state_dict or not any(p.search(k) for p in optional)}

    for transform in cmap.transforms:
        fn = _transform(transform.op, cmap)
        pattern = re.compile(transform.match)
        for key in [k for k in out if pattern.search(k)]:
            out[key] = _apply(fn, transform.op, key, out[key], cmap)

    hook = cmap.hook("state_dict")
    if hook is not None:
        out = hook(out, checkpoint, target_state_dict)

    return _handle_num_batches_tracked(out, cmap.num_batches_tracked, target_state_dict)


def _transform(op: str, cmap: ConversionMap) -> Callable[[Tensor], Tensor]:
    if op not in TRANSFORMS and cmap.hooks:
        for which in cmap.hooks:  # a family's hook module may register its ops when it is imported
            cmap.hook(which)
    if op not in TRANSFORMS:
        raise ConfigError(f"{cmap.path or cmap.name}: field 'transforms': unknown op '{op}' "
                          f"(known: {', '.join(sorted(TRANSFORMS))})")
    return TRANSFORMS[op]


def _apply(fn: Callable[[Tensor], Tensor], op: str, key: str, tensor: Tensor, cmap: ConversionMap) -> Tensor:
    """``fn(tensor)``; whatever it raises on a tensor it was not written for is a ConversionError naming it."""
    try:
        result = fn(tensor)
    except ZooError:
        raise
    except Exception as exc:
        raise ConversionError(f"map '{cmap.name}': transform '{op}' failed on '{key}' {list(tensor.shape)} "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(result, Tensor):
        raise ConversionError(f"map '{cmap.name}': transform '{op}' returned a {type(result).__name__} for '{key}'")
    return result


def _handle_num_batches_tracked(state: dict[str, Tensor], mode: str,
                                target: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    if mode == "keep":
        return state
    if mode == "drop":
        return {k: v for k, v in state.items() if not k.endswith(NUM_BATCHES_TRACKED)}
    if target is None:  # fill: nothing to fill against
        return state
    out = {k: v for k, v in state.items() if not k.endswith(NUM_BATCHES_TRACKED) or k in target}
    prefixes = {k.rsplit(".", 1)[0] for k in out if "." in k}
    for key in target:
        if key.endswith(NUM_BATCHES_TRACKED) and key not in out:
            layer = key[: -len(NUM_BATCHES_TRACKED)].rstrip(".")
            if layer in prefixes or not layer:
                # torch 0.4.0 checkpoints predate this buffer; 0 is what BatchNorm starts with.
                out[key] = torch.zeros((), dtype=torch.int64)
    return out

