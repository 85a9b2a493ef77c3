"""Checkpoints at the lowest level: read any file safely, compare and load state dicts, write safetensors.

- :func:`load_checkpoint` reads a file without executing anything in it. Pickles (``.pth``,
  ``.pth.tar``, ``.pkl``, ``.t7``, ``.tar``; both torch's zip format and the legacy pre-1.6 / torch 0.4
  format) go through ``torch.load(weights_only=True, map_location='cpu')`` with a small explicit
  allow-list of what old training checkpoints hold (:func:`allowed_globals`). Any other global is
  refused with :class:`~zoo.errors.CheckpointError` naming it, and is never executed.
  ``.safetensors`` files are read with safetensors.
- :func:`as_state_dict` insists that what was read is a flat ``dict[str, Tensor]``.
- :func:`compare_state_dicts` / :func:`load_into` check key names, shapes and dtypes against a model
  and load strictly, reporting missing, unexpected, mis-shaped and wrongly typed keys together
  (:class:`LoadReport`); :func:`load_into` also refuses non-finite weights (``allow_nonfinite=True``
  loads them).
- :func:`state_dict_signature` identifies a target layout; :func:`save_safetensors` writes one.

This is the engine's floor (timm's ``_helpers.py`` role): it imports no other zoo module but
:mod:`zoo.errors` and :mod:`zoo._fs`.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import pickle
import pickletools
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zoo._fs import first_line
from zoo.errors import CheckpointError, ConversionError

logger = logging.getLogger(__name__)

__all__ = [
    "PICKLE_SUFFIXES", "LoadReport", "allowed_globals", "as_state_dict", "compare_state_dicts", "load_checkpoint",
    "load_into", "nonfinite_tensors", "save_safetensors", "state_dict_signature",
]

PICKLE_SUFFIXES = (".pth", ".pt", ".pth.tar", ".pkl", ".t7", ".tar", ".bin", ".ckpt")
NUM_BATCHES_TRACKED = "num_batches_tracked"

# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------


def allowed_globals() -> list:
    """What ``torch.load(weights_only=True)`` may rebuild on top of torch's own defaults.

    Old training checkpoints hold, next to tensors: the run's ``argparse.Namespace`` (DETR's
    ``args``), numpy scalars / arrays (``best_prec1``, ``best_rank1``) and, from numpy 2, the dtype
    classes they BUILD. numpy 1.x pickles name ``numpy.core.multiarray.*`` and numpy 2 pickles
    ``numpy._core.multiarray.*``; both names are listed. None of these run code on construction.
    """
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
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ValueError, RuntimeError, MemoryError for a lying header
        raise CheckpointError(f"cannot read safetensors file {path}: corrupt or truncated ({exc})") from exc


def _load_pickle(path: Path) -> Any:
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
            ) from exc
        if "Invalid magic number" in message:
            return _load_plain_pickle(path, exc)
        raise CheckpointError(f"cannot read checkpoint {path}: {_unpickling_reason(path, message)}") from exc
    except Exception as exc:  # torch.load raises many types for truncated or corrupt files (EOFError, struct.error, ...)
        if "Invalid magic number" in str(exc):  # not written by torch.save: maybe a plain pickle
            return _load_plain_pickle(path, exc)
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or truncated "
                              f"({type(exc).__name__}: {first_line(str(exc))})") from exc


_OPERAND_RE = re.compile(r"Unsupported operand (\d+)")
_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def _pickle_protocol(path: Path) -> int | None:
    """The protocol of a pickle file (its ``PROTO`` opcode), None when it does not start with one."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _unpickling_reason(path: Path, message: str) -> str:
    """Why torch's weights-only unpickler refused ``path``, in words: an opcode it does not implement (pickle
    protocols 3-5 of plain ``pickle.dump`` files) is not corruption, and the way out is named."""
    match = _OPERAND_RE.search(message)
    if match is None:
        return f"corrupt or truncated ({first_line(message)})"
    code = int(match.group(1))
    if code not in _OPCODE_NAMES:
        return f"corrupt or not a pickle (byte {code} where a pickle opcode belongs)"
    protocol = _pickle_protocol(path)
    written = f"a pickle of protocol {protocol}" if protocol is not None else "a pickle"
    return (f"{written} using opcode {_OPCODE_NAMES.get(code, '?')} ({code}), which torch's weights-only unpickler "
            f"does not implement; re-save it with torch.save, pickle protocol 2, or as safetensors")


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
                                  f"(loading it could run code); it was not executed") from exc
        if _OPERAND_RE.search(str(exc)):
            raise CheckpointError(f"cannot read checkpoint {path}: {_unpickling_reason(path, str(exc))}") from exc
        raise CheckpointError(f"cannot read checkpoint {path}: neither a torch file nor a plain pickle "
                              f"({type(exc).__name__}: {first_line(str(exc))})") from exc
    return _numpy_to_torch(obj)


def _numpy_to_torch(obj: Any) -> Any:
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        # np.array, not np.ascontiguousarray: that one turns a 0-d array into shape (1,)
        return torch.from_numpy(np.array(obj, order="C", copy=True))
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Comparing and loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What did not fit: key lists, ``mismatched`` as ``key -> (checkpoint shape, model shape)`` and
    ``wrong_dtype`` as ``key -> (checkpoint dtype, model dtype)``.

    ``cast`` lists the tensors that load with a lossless change of dtype (float16 weights into a
    float32 model, int32 counters into int64 buffers): they fit, and are reported for the record.
    """

    missing: dict[str, tuple[int, ...]] = field(default_factory=dict)       # key -> model shape
    unexpected: dict[str, tuple[int, ...]] = field(default_factory=dict)    # key -> checkpoint shape
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    wrong_dtype: dict[str, tuple[str, str]] = field(default_factory=dict)
    cast: dict[str, tuple[str, str]] = field(default_factory=dict)
    target: str = "model"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def __bool__(self) -> bool:  # truthy when something is wrong, like a list of problems
        return not self.ok

    def fitting(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The entries of ``state_dict`` that load: all but the unexpected, mis-shaped and wrongly typed ones."""
        unfit = self.unexpected.keys() | self.mismatched.keys() | self.wrong_dtype.keys()
        return {k: v for k, v in state_dict.items() if k not in unfit}

    def format(self, limit: int = 40) -> str:
        """A multi-line report; each list shows at most ``limit`` entries."""
        if self.ok:
            return f"state dict fits {self.target}"
        lines = [f"state dict does not fit {self.target}: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped"
                 + (f", {len(self.wrong_dtype)} of the wrong dtype" if self.wrong_dtype else "")]

        def section(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {s}" for s in items[:limit])
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")

        section("missing (in the model, not in the weights)", [f"{k} {list(s)}" for k, s in self.missing.items()])
        section("unexpected (in the weights, not in the model)", [f"{k} {list(s)}" for k, s in self.unexpected.items()])
        section("mis-shaped", [f"{k}: weights {list(a)} vs model {list(b)}" for k, (a, b) in self.mismatched.items()])
        section("wrong dtype (a float tensor must be floating, an integer buffer integer, a change of float "
                "precision lossless)", [f"{k}: weights {a} vs model {b}" for k, (a, b) in self.wrong_dtype.items()])
        if self.missing and all(k.endswith(NUM_BATCHES_TRACKED) for k in self.missing):
            lines.append("  hint: only num_batches_tracked is missing (a torch 0.4 checkpoint): convert it with a map "
                         "that has `num_batches_tracked: fill`")
        return "\n".join(lines)

    __str__ = format


def _dtype_fit(value: Tensor, dtype: torch.dtype) -> str:
    """``'same'``, ``'cast'`` (a lossless change: float to float or integer to integer, every value kept exactly)
    or ``'wrong'`` (a float tensor from integers, booleans or reinterpreted bytes, or the other way round, or
    a narrowing that changes values).

    Only ``value``'s data is read, so ``dtype`` may come from a meta-device model."""
    src = value.dtype
    if src == dtype:
        return "same"
    if src.is_complex or dtype.is_complex or torch.bool in (src, dtype) or src.is_floating_point != dtype.is_floating_point:
        return "wrong"
    if value.numel() == 0 or value.device.type == "meta" or _widens(src, dtype):
        return "cast"
    back = value.to(dtype).to(src)
    same = back == value
    if src.is_floating_point:
        same |= back.isnan() & value.isnan()
    return "cast" if bool(same.all()) else "wrong"


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of ``src`` is exactly a value of ``dst`` (float16 -> float32, int32 -> int64)."""
    if src.is_floating_point:
        a, b = torch.finfo(src), torch.finfo(dst)
        return b.bits > a.bits and b.max >= a.max and b.eps <= a.eps
    a, b = torch.iinfo(src), torch.iinfo(dst)
    return b.min <= a.min and b.max >= a.max


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else ()


def compare_state_dicts(state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor],
                        target_name: str = "model") -> LoadReport:
    """Compare key sets, shapes and dtypes of ``state_dict`` against ``target`` (whose tensors may be on the
    meta device: only their shapes and dtypes are read)."""
    report = LoadReport(target=target_name)
    for key, t in target.items():
        if key not in state_dict:
            report.missing[key] = tuple(t.shape)
            continue
        value = state_dict[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(t.shape):
            report.mismatched[key] = (_shape(value), tuple(t.shape))
            continue
        fit = _dtype_fit(value, t.dtype)
        if fit != "same":
            (report.cast if fit == "cast" else report.wrong_dtype)[key] = (_dtype_name(value.dtype),
                                                                            _dtype_name(t.dtype))
    for key, t in state_dict.items():
        if key not in target:
            report.unexpected[key] = _shape(t)
    return report


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def nonfinite_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """``key -> number of NaN/inf values`` of every floating tensor of ``state_dict`` that holds any."""
    found = {}
    for key, value in state_dict.items():
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()) and value.device.type != "meta":
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                found[key] = bad
    return found


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True, *,
              allow_nonfinite: bool = False) -> LoadReport:
    """Load ``state_dict`` into ``model``, checking key names, shapes and dtypes first.

    strict=True: any missing, unexpected, mis-shaped or wrongly typed key raises one ConversionError
    listing all of them (with shapes and dtypes) and the model is left untouched. strict=False: loads
    what fits, logs the same report as a warning, and returns it. A lossless change of dtype loads
    (:attr:`LoadReport.cast`, logged). Weights holding NaN or inf raise a ConversionError naming the
    tensors, unless ``allow_nonfinite=True``. Returns the (empty when all fits) LoadReport.
    """
    report = compare_state_dicts(state_dict, model.state_dict(), target_name=type(model).__name__)
    if report and strict:
        raise ConversionError(report.format())
    fitting = report.fitting(state_dict)
    nonfinite = {} if allow_nonfinite else nonfinite_tensors(fitting)
    if nonfinite:
        listed = ", ".join(f"{key} ({count} values)" for key, count in list(nonfinite.items())[:20])
        more = f" and {len(nonfinite) - 20} more" if len(nonfinite) > 20 else ""
        raise ConversionError(f"the weights for {report.target} hold NaN or inf in {len(nonfinite)} tensors: "
                              f"{listed}{more}; nothing was loaded (allow_nonfinite=True loads them anyway)")
    model.load_state_dict(fitting, strict=not report)
    if report.cast:
        logger.info("loaded %d tensors with a lossless change of dtype: %s", len(report.cast),
                    ", ".join(f"{k} {a}->{b}" for k, (a, b) in list(report.cast.items())[:10]))
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


def save_safetensors(state_dict: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors: CPU, contiguous, and every tensor its own storage (clones).

    The same tensors and metadata give the same bytes (so the same sha256): safetensors writes the
    metadata in a hash map's order, which changes from process to process, so it is put in sorted
    order afterwards (same length, so the offsets stay valid).
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    metadata = metadata or {"format": "pt"}
    save_file(tensors, str(path), metadata=metadata)
    _sort_metadata(Path(path), metadata)


def _sort_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Rewrite the ``__metadata__`` object of a safetensors header with its keys sorted, in place."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = f.read(length)
        written = json.loads(header)["__metadata__"]
        old = json.dumps(written, separators=(",", ":"), ensure_ascii=False).encode()
        new = json.dumps(dict(sorted(written.items())), separators=(",", ":"), ensure_ascii=False).encode()
        at = header.find(b'"__metadata__":' + old)
        if at < 0 or written != dict(metadata):
            return  # another layout than the one known: leave the file as written
        start = at + len(b'"__metadata__":')
        f.seek(8 + start)
        f.write(new)


def as_state_dict(obj: Any, where: Any) -> dict[str, Tensor]:
    """``obj`` as a flat ``dict[str, Tensor]``; a training container or anything else is a CheckpointError
    naming ``where`` (and, for a container, its top-level keys and the way to convert it)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping) and obj and not any(isinstance(v, (Mapping, list, tuple)) for v in obj.values()):
        key, value = next((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        kind = f"{type(value).__module__}.{type(value).__name__}" + (
            f" of dtype {value.dtype}" if isinstance(value, np.ndarray) else "")
        raise CheckpointError(f"{where} is not a state dict: '{key}' holds a {kind}, not a tensor")
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:10]))
        raise CheckpointError(f"{where} is not a flat state dict (top-level keys: {keys}); it is an original "
                              f"training checkpoint: convert it (`python -m zoo convert SRC --out DIR`, or "
                              f"create_model(name, weights=SRC, converter=<map in convert/>))")
    raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict")
