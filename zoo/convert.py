"""The conversion engine: original checkpoints in, strict state dicts and safetensors folders out.

Three steps, each usable alone:

1. :func:`load_checkpoint` reads a file safely. Pickles (``.pth``, ``.pth.tar``, ``.pkl``, ``.t7``,
   ``.tar``; both torch's zip format and the legacy pre-1.6 / torch 0.4 format) go through
   ``torch.load(weights_only=True, map_location='cpu')`` with a small explicit allow-list of what
   old training checkpoints hold (``argparse.Namespace``, numpy scalars, arrays and dtypes,
   ``collections.defaultdict``). Any other global is refused with :class:`CheckpointError` naming
   it, and is never executed. ``.safetensors`` files are read with safetensors.
2. :func:`convert_state_dict` applies a declarative :class:`ConversionMap` (``convert/<name>.yaml``):
   unwrap the container, strip prefixes, regex renames, drops, named tensor transforms, an
   optional Python hook, then ``num_batches_tracked`` handling against the target.
3. :func:`load_into` loads strictly and reports missing, unexpected and mis-shaped keys together;
   :func:`convert_checkpoint` does 1-3 and writes ``model.safetensors`` + ``config.json`` +
   ``README.md``, a folder that ``zoo.create_model(name, weights=DIR)`` loads.

A map file, field by field (all but ``name`` optional)::

    name: rga                          # must equal the file stem
    description: free text
    version: 1                         # bump when the map's output changes: part of the cache key
    target_model: rga_sc_resnet50      # registry name built by convert_checkpoint; null = caller gives it
    container: [state_dict, model]     # keys tried in order to find the weights in a dict container
    strip_prefixes: ["module."]        # each stripped once, in order, where a key starts with it
    renames: [['^E_conv\\.', 'H1.']]   # re.sub(pattern, replacement, key), in order
    drops: ['^fc\\.']                  # re.search patterns: matching keys are removed
    drop_if_absent: ['^fc\\.']         # removed only when the target state dict has no such key
    transforms: [{match: '\\.weight$', op: unsqueeze_temporal}]   # see TRANSFORMS
    num_batches_tracked: fill          # fill | keep | drop
    hooks: {state_dict: 'zoo.models.x:f', model_kwargs: 'zoo.models.x:g'}
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from zoo.errors import CheckpointError, ConfigError, ConversionError
from zoo.paths import convert_dir

logger = logging.getLogger(__name__)

__all__ = [
    "TRANSFORMS", "ConversionMap", "LoadReport", "Transform", "allowed_globals", "convert_checkpoint",
    "convert_state_dict", "list_maps", "load_checkpoint", "load_into", "load_map", "register_transform",
    "state_dict_signature",
]

PICKLE_SUFFIXES = (".pth", ".pt", ".pth.tar", ".pkl", ".t7", ".tar", ".bin", ".ckpt")
NUM_BATCHES_TRACKED = "num_batches_tracked"

# --------------------------------------------------------------------------------------------
# 1. Safe loading
# --------------------------------------------------------------------------------------------


def allowed_globals() -> list:
    """What ``torch.load(weights_only=True)`` may rebuild on top of torch's own defaults.

    Old training checkpoints hold, next to tensors: the run's ``argparse.Namespace`` (DETR's
    ``args``), numpy scalars / arrays (``best_prec1``, ``best_rank1``) and, from numpy 2, the dtype
    classes they BUILD. numpy 1.x pickles name ``numpy.core.multiarray.*`` and numpy 2 pickles
    ``numpy._core.multiarray.*``; both names are listed. None of these run code on construction.
    """
    import argparse
    import collections

    import numpy as np

    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]

    entries: list = [argparse.Namespace, collections.defaultdict, np.ndarray, np.dtype,
                     multiarray.scalar, multiarray._reconstruct]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((multiarray.scalar, f"{module}.scalar"))
        entries.append((multiarray._reconstruct, f"{module}._reconstruct"))
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype, BUILD needs them allowed
    if dtypes is not None:
        entries += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return entries


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _refused_global(message: str) -> str | None:
    """The ``module.name`` torch's weights-only unpickler refused, parsed from its message."""
    match = _GLOBAL_RE.search(message)
    if match is None:
        return None
    name = match.group(1)
    return name if "." in name else f"builtins.{name}"  # torch prints builtins without their module


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a checkpoint file without executing anything in it.

    Returns what the file holds: for pickles usually a dict (a flat state dict or a training
    container such as ``{'state_dict': ..., 'epoch': ..., 'args': Namespace}``), for
    ``.safetensors`` a ``dict[str, Tensor]``. Every tensor is on the CPU (CUDA storages are mapped).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or corrupt, and
    naming the global when the pickle references anything outside torch's defaults and
    :func:`allowed_globals` (that global is never imported or called).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    return _load_pickle(path)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: corrupt or truncated ({exc})") from exc


def _load_pickle(path: Path) -> Any:
    import pickle

    def attempt(**extra):
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, **extra)

    try:
        try:
            return attempt()
        except UnicodeDecodeError:
            # Python 2 pickles (torch 0.3/0.4 era) hold byte strings that only latin1 decodes 1:1.
            return attempt(encoding="latin1")
    except pickle.UnpicklingError as exc:
        message = str(exc)
        name = _refused_global(message)
        if name is not None:
            raise CheckpointError(
                f"checkpoint {path} references the global '{name}', which RelZoo does not load "
                f"(loading it could run code); it was not executed. Allowed beyond torch's defaults: "
                f"argparse.Namespace, numpy scalars/arrays/dtypes, collections.defaultdict"
            ) from None
        if "Invalid magic number" in message:
            return _load_plain_pickle(path, exc)
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or truncated ({_first_line(message)})") from exc
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError) as exc:
        if "Invalid magic number" in str(exc):  # not written by torch.save: maybe a plain pickle
            return _load_plain_pickle(path, exc)
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or truncated "
                              f"({type(exc).__name__}: {_first_line(str(exc))})") from exc


def _load_plain_pickle(path: Path, original: Exception) -> Any:
    """A ``.pkl`` written by ``pickle.dump`` rather than ``torch.save`` (numpy arrays become tensors).

    Uses torch's weights-only unpickler directly with the same allow-list, so the same refusals apply.
    """
    try:
        from torch import _weights_only_unpickler as wou
    except ImportError:  # pragma: no cover - only if torch drops the module
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch file ({original})") from original
    try:
        with torch.serialization.safe_globals(allowed_globals()), open(path, "rb") as f:
            obj = wou.Unpickler(f, encoding="latin1").load()
    except Exception as exc:  # the unpickler raises many types for garbage input
        name = _refused_global(str(exc))
        if name is not None:
            raise CheckpointError(f"checkpoint {path} references the global '{name}', which RelZoo does not load "
                                  f"(loading it could run code); it was not executed") from None
        raise CheckpointError(f"cannot read checkpoint {path}: neither a torch file nor a plain pickle "
                              f"({type(exc).__name__}: {_first_line(str(exc))})") from exc
    return _numpy_to_torch(obj)


def _numpy_to_torch(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    return obj


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


# --------------------------------------------------------------------------------------------
# 2. Maps and transforms
# --------------------------------------------------------------------------------------------

TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {}


def register_transform(name: str) -> Callable[[Callable[[Tensor], Tensor]], Callable[[Tensor], Tensor]]:
    """Decorator adding a named tensor op usable in a map's ``transforms``: ``f(tensor) -> tensor``."""

    def decorator(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        if name in TRANSFORMS and TRANSFORMS[name] is not fn:
            raise ValueError(f"transform '{name}' is already registered ({TRANSFORMS[name]!r})")
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


@dataclass(frozen=True)
class Transform:
    """Apply ``TRANSFORMS[op]`` to every tensor whose (renamed) key matches ``match`` (re.search)."""

    match: str
    op: str


_NBT_MODES = ("fill", "keep", "drop")
_HOOK_NAMES = ("state_dict", "model_kwargs")


@dataclass
class ConversionMap:
    """One ``convert/<name>.yaml``: how an original codebase's checkpoints map onto ours (see module doc)."""

    name: str
    description: str = ""
    version: int = 1
    target_model: str | None = None
    container: tuple[str, ...] = ()
    strip_prefixes: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    drops: tuple[str, ...] = ()
    drop_if_absent: tuple[str, ...] = ()
    transforms: tuple[Transform, ...] = ()
    num_batches_tracked: str = "fill"
    hooks: dict[str, str] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)  # the file it came from (not a YAML field)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> ConversionMap:
        """Validate a parsed YAML mapping; every problem raises ConfigError naming ``source`` and the field."""

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
        description = data.get("description") or ""
        if not isinstance(description, str):
            raise fail("description", f"expected a string, got {description!r}")

        return cls(name=data["name"], description=description.strip(), version=version, target_model=target,
                   container=str_list("container"), strip_prefixes=str_list("strip_prefixes"),
                   renames=tuple(renames), drops=regexes("drops"), drop_if_absent=regexes("drop_if_absent"),
                   transforms=tuple(transforms), num_batches_tracked=nbt, hooks=dict(hooks))

    def hook(self, which: str) -> Callable | None:
        """Import and return ``hooks[which]`` (``'state_dict'`` or ``'model_kwargs'``), or None."""
        spec = self.hooks.get(which)
        if spec is None:
            return None
        module_name, _, attr = spec.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{self.path or self.name}: field 'hooks.{which}': cannot import {spec!r} ({exc})") from exc
        if not callable(obj):
            raise ConfigError(f"{self.path or self.name}: field 'hooks.{which}': {spec!r} is not callable")
        return obj


def _compile(pattern: str, fail: Callable[[str], Exception]) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise fail(f"invalid regular expression {pattern!r}: {exc}") from None


def list_maps() -> list[str]:
    """Names of the maps in ``convert/`` (file stems), sorted."""
    folder = convert_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_map(name: str | os.PathLike) -> ConversionMap:
    """Load and validate ``convert/<name>.yaml`` (or a path to a map file).

    Raises ConfigError for an unknown name (listing the known ones) or a malformed file (naming file and field).
    """
    import yaml

    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        path = candidate
    else:
        path = convert_dir() / f"{name}.yaml"
        if not path.is_file():
            import difflib

            known = list_maps()
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown conversion map '{name}' (no {path}){hint} Known maps: {', '.join(known) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    cmap = ConversionMap.from_dict(data, source=str(path))
    if path.parent == convert_dir() and cmap.name != path.stem:
        raise ConfigError(f"{path}: field 'name': '{cmap.name}' must equal the file stem '{path.stem}'")
    cmap.path = path
    return cmap


# --------------------------------------------------------------------------------------------
# 3. Applying a map
# --------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


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


def convert_state_dict(checkpoint: Any, cmap: ConversionMap | str,
                       target_state_dict: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Map an original checkpoint's weights onto our key names.

    Steps, in order: unwrap ``cmap.container``; strip prefixes; renames; drops (and
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
    state = unwrap_container(checkpoint, cmap.container)

    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    renames = [(re.compile(p), r) for p, r in cmap.renames]
    drops = [re.compile(p) for p in cmap.drops]
    for key, tensor in state.items():
        new = key
        for prefix in cmap.strip_prefixes:
            if new.startswith(prefix):
                new = new[len(prefix):]
        for pattern, replacement in renames:
            new = pattern.sub(replacement, new)
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
            out[key] = fn(out[key])

    hook = cmap.hook("state_dict")
    if hook is not None:
        out = dict(hook(out, checkpoint, target_state_dict))

    return _handle_num_batches_tracked(out, cmap.num_batches_tracked, target_state_dict)


def _transform(op: str, cmap: ConversionMap) -> Callable[[Tensor], Tensor]:
    if op not in TRANSFORMS and cmap.hooks:
        for which in cmap.hooks:  # a family's hook module usually registers its ops too
            cmap.hook(which)
    if op not in TRANSFORMS:
        # Families register their ops at import; listing the models imports every zoo.models module.
        from zoo.registry import list_models

        list_models()
    if op not in TRANSFORMS:
        raise ConfigError(f"{cmap.path or cmap.name}: field 'transforms': unknown op '{op}' "
                          f"(known: {', '.join(sorted(TRANSFORMS))})")
    return TRANSFORMS[op]


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


# --------------------------------------------------------------------------------------------
# 4. Strict loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What did not fit: key lists, and ``mismatched`` as ``key -> (checkpoint shape, model shape)``."""

    missing: dict[str, tuple[int, ...]] = field(default_factory=dict)       # key -> model shape
    unexpected: dict[str, tuple[int, ...]] = field(default_factory=dict)    # key -> checkpoint shape
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    target: str = "model"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __bool__(self) -> bool:  # truthy when something is wrong, like a list of problems
        return not self.ok

    def format(self, limit: int = 40) -> str:
        """A multi-line report; each list shows at most ``limit`` entries."""
        if self.ok:
            return f"state dict fits {self.target}"
        lines = [f"state dict does not fit {self.target}: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped"]

        def section(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {s}" for s in items[:limit])
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")

        section("missing (in the model, not in the weights)", [f"{k} {list(s)}" for k, s in self.missing.items()])
        section("unexpected (in the weights, not in the model)", [f"{k} {list(s)}" for k, s in self.unexpected.items()])
        section("mis-shaped", [f"{k}: weights {list(a)} vs model {list(b)}" for k, (a, b) in self.mismatched.items()])
        if self.missing and all(k.endswith(NUM_BATCHES_TRACKED) for k in self.missing):
            lines.append("  hint: only num_batches_tracked is missing (a torch 0.4 checkpoint): convert it with a map "
                         "that has `num_batches_tracked: fill`")
        return "\n".join(lines)

    __str__ = format


def compare_state_dicts(state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor],
                        target_name: str = "model") -> LoadReport:
    """Compare key sets and shapes of ``state_dict`` against ``target``."""
    report = LoadReport(target=target_name)
    for key, t in target.items():
        if key not in state_dict:
            report.missing[key] = tuple(t.shape)
        elif tuple(state_dict[key].shape) != tuple(t.shape):
            report.mismatched[key] = (tuple(state_dict[key].shape), tuple(t.shape))
    for key, t in state_dict.items():
        if key not in target:
            report.unexpected[key] = tuple(getattr(t, "shape", ()))
    return report


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> LoadReport:
    """Load ``state_dict`` into ``model``, checking key names and shapes first.

    strict=True: any missing, unexpected or mis-shaped key raises one ConversionError listing all of
    them (with shapes) and the model is left untouched. strict=False: loads what fits, logs the
    same report as a warning, and returns it. Returns the (empty when all fits) LoadReport.
    """
    report = compare_state_dicts(state_dict, model.state_dict(), target_name=type(model).__name__)
    if report and strict:
        raise ConversionError(report.format())
    fitting = {k: v for k, v in state_dict.items() if k not in report.unexpected and k not in report.mismatched}
    model.load_state_dict(fitting, strict=not report)
    if report:
        logger.warning("%s", report.format())
    return report


def state_dict_signature(state_dict: Mapping[str, Tensor]) -> str:
    """A short hash of a state dict's key names, shapes and dtypes (not values): identifies a target layout."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        digest.update(f"{key}:{list(t.shape)}:{t.dtype}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# 5. A converted folder
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors: CPU, contiguous, and every tensor its own storage (clones)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def convert_checkpoint(src: str | os.PathLike, from_map: str | ConversionMap, out_dir: str | os.PathLike,
                       model_name: str | None = None, model_kwargs: dict | None = None, strict: bool = True,
                       *, model: nn.Module | None = None, source: str | None = None) -> Path:
    """Convert an original checkpoint into a RelZoo folder and return the folder's path.

    The target is ``zoo.registry.create_model(model_name or cmap.target_model, **kwargs)``, kwargs
    being the map's ``model_kwargs`` hook result updated by ``model_kwargs``; a caller may instead
    pass a built ``model`` (with ``model_name`` naming it for config.json). The converted state dict
    is checked with :func:`load_into` (strict by default; with strict=False the keys that fit are
    written and the report is kept in config.json). Writes, atomically (temp folder + rename):

    - ``model.safetensors``
    - ``config.json``: ``{"model", "kwargs", "converter", "converter_version", "source", "source_sha256"}``
    - ``README.md``: a model card with YAML front matter (``library_name: relzoo``, tags, and
      ``model-index`` with the registry's reported metrics when known).

    ``src`` is a local file, an http(s) URL or an ``hf://`` file (downloaded through
    :func:`zoo.weights.fetch` first). ``source`` overrides what config.json records as the origin.
    """
    from zoo.weights import fetch, parse_source

    cmap = load_map(from_map) if not isinstance(from_map, ConversionMap) else from_map
    parsed = parse_source(src)
    source = source or (str(parsed.path) if parsed.kind == "local" else parsed.text)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    src = fetch(parsed)  # a URL or hf:// source is downloaded (and cached) first
    if src.is_dir():
        raise CheckpointError(f"{src} is a folder; convert_checkpoint needs a checkpoint file")

    checkpoint = load_checkpoint(src)
    kwargs: dict = {}
    kwargs_hook = cmap.hook("model_kwargs")
    if kwargs_hook is not None:
        kwargs.update(kwargs_hook(checkpoint) or {})
    kwargs.update(model_kwargs or {})

    name = model_name or cmap.target_model
    if model is None:
        if not name:
            raise ConfigError(f"conversion map '{cmap.name}' has no target_model; pass model_name (--model NAME)")
        from zoo.registry import create_model

        model = create_model(name, **kwargs)
    name = name or type(model).__name__

    state = convert_state_dict(checkpoint, cmap, model.state_dict())
    report = load_into(model, state, strict=strict)
    if report:
        state = {k: v for k, v in state.items() if k not in report.unexpected and k not in report.mismatched}

    config = {
        "model": name,
        "kwargs": _jsonable(kwargs),
        "converter": cmap.name,
        "converter_version": cmap.version,
        "source": source,
        "source_sha256": file_sha256(src),
    }
    if report:
        config["incomplete"] = {"missing": sorted(report.missing), "unexpected": sorted(report.unexpected),
                                "mismatched": sorted(report.mismatched)}

    origin = f"Converted for RelZoo from `{config['source']}` with the `{cmap.name}` map (version {cmap.version})."
    card = model_card(name, config, origin, extra_tags=[f"converter:{cmap.name}"])
    write_model_folder(out_dir, state, config, card, metadata={"converter": cmap.name})
    logger.info("converted %s with map '%s' into %s", src, cmap.name, out_dir)
    return out_dir


def write_model_folder(out_dir: str | os.PathLike, state_dict: Mapping[str, Tensor], config: dict, card: str,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (the card) atomically.

    The layout ``create_model(name, weights=DIR)`` loads and the Hugging Face Hub shows; used by
    ``zoo convert`` and ``zoo export``. Readers see the old folder or the new one, never half of one.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_safetensors(state_dict, tmp / "model.safetensors",
                         metadata={"format": "pt", "relzoo_model": str(config["model"]), **(metadata or {})})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier conversion."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConversionError(f"output {out_dir} exists and is not a folder")
        entries = {p.name for p in out_dir.iterdir()}
        if entries and not (out_dir / "config.json").is_file():
            raise ConversionError(f"output folder {out_dir} is not empty and not a RelZoo conversion; "
                                  f"choose another --out or empty it")
        if entries - {"model.safetensors", "config.json", "README.md"}:
            raise ConversionError(f"output folder {out_dir} holds other files ({', '.join(sorted(entries))}); "
                                  f"choose another --out")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir`` so readers see the old folder or the new one, never half of one."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise ConversionError(f"model kwarg value {value!r} ({type(value).__name__}) cannot be stored in config.json")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Read a field from a dataclass-like object or a dict (the registry's config objects)."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def model_card(name: str, config: dict, origin: str, extra_tags: Sequence[str] = ()) -> str:
    """A Hugging Face model card: YAML front matter (``library_name``, tags, ``model-index`` with the
    reported metrics of the weights this folder holds) and a body saying where the weights came from."""
    import yaml

    info = None
    try:
        from zoo.registry import model_info

        info = model_info(name)
    except Exception:  # not a registered name (a caller-built model) or registry unavailable
        info = None

    task = _get(info, "task") if info is not None else None
    reported = list(_get(info, "reported", None) or []) if info is not None else []
    tag = _matching_weights_tag(info, config) if info is not None else None
    # Rows of the weights entry this file is (matched by sha256 or file name); otherwise only the
    # paper's rows without released weights: another entry's numbers would be misattributed.
    rows = [r for r in reported if _get(r, "weights") == tag]

    front: dict[str, Any] = {"library_name": "relzoo", "tags": ["relzoo", *extra_tags]}
    if task:
        front["tags"].append(re.sub(r"[^a-z0-9]+", "-", str(task).lower()).strip("-"))
    if rows:
        task_type = re.sub(r"[^a-z0-9]+", "-", str(task or "unknown").lower()).strip("-")
        by_dataset: dict[str, dict] = {}  # one result per dataset, its metrics together (HF's layout)
        for row in rows:
            dataset = str(_get(row, "dataset"))
            result = by_dataset.setdefault(dataset, {
                "task": {"type": task_type, "name": str(task or "unknown")},
                "dataset": {"name": dataset, "type": dataset}, "metrics": []})
            result["metrics"].append({"type": str(_get(row, "metric")), "name": str(_get(row, "metric")),
                                      "value": _get(row, "value")})
            if _get(row, "source") and "source" not in result:
                result["source"] = {"name": str(_get(row, "source"))}
        results = list(by_dataset.values())
        front["model-index"] = [{"name": name, "results": results}]

    body = [f"# {name}", "", origin, ""]
    if config.get("source_sha256"):
        body.append(f"- source sha256: `{config['source_sha256']}`")
    body += [f"- constructor kwargs: `{json.dumps(config['kwargs'])}`", "",
            "```python", "import zoo", f"model = zoo.create_model({name!r}, weights='path/to/this/folder')", "```", ""]
    if rows:
        note = (f"for the `{tag}` weights" if tag is not None
                else "by the paper, for the architecture; not measured on this file")
        body += [f"Reported metrics ({note}):", "", "| metric | value | dataset | source |", "|---|---|---|---|"]
        body += [f"| {_get(r, 'metric')} | {_get(r, 'value')} | {_get(r, 'dataset')} | {_get(r, 'source') or ''} |"
                 for r in rows]
        body.append("")
    if "incomplete" in config:
        body += ["**Incomplete conversion** (strict=False): see `incomplete` in config.json.", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)


def _matching_weights_tag(info: Any, config: dict) -> str | None:
    """The weights tag of the registry entry this file came from (same sha256, or same file name)."""
    weights = _get(info, "weights", None) or {}
    items = weights.items() if isinstance(weights, Mapping) else []
    src_name = Path(str(config.get("source", ""))).name
    for tag, entry in items:
        if _get(entry, "sha256") and _get(entry, "sha256") == config.get("source_sha256"):
            return tag
    for tag, entry in items:
        source = _get(entry, "source")
        if source and Path(str(source)).name == src_name:
            return tag
    return None
