"""The RelZoo folder: ``config.json`` + ``model.safetensors`` + ``README.md`` (a model card).

What ``zoo convert`` and ``zoo export`` write, what ``create_model(name, weights=DIR)`` and
``weights='hf://org/repo[@rev]'`` read, and what the Hugging Face Hub shows (timm's ``_hub.py``
role): the file names, reading and writing the folder, and the model card, all in this one place.

``config.json`` holds ``{"model": registry name, "kwargs": constructor kwargs, "source": where the
weights came from, ...}`` (``converter``, ``converter_version`` and ``source_sha256`` for conversions;
``incomplete`` for a strict=False conversion). Writing is atomic: readers see the old folder or the
new one, never half of one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import yaml
from torch import Tensor

from zoo._fs import replace_dir
from zoo.checkpoint import as_state_dict, load_checkpoint, save_safetensors
from zoo.config import ModelConfig
from zoo.errors import ConversionError, WeightsError, ZooError
from zoo.registry import model_info

__all__ = ["FOLDER_WEIGHTS", "FOLDER_CONFIG", "FOLDER_CARD", "FOLDER_PLOTS", "HF_FALLBACK_WEIGHTS", "read_folder_config",
           "load_folder_weights", "write_model_folder", "check_out_dir", "model_card", "jsonable"]

FOLDER_WEIGHTS = "model.safetensors"
FOLDER_CONFIG = "config.json"
FOLDER_CARD = "README.md"
HF_FALLBACK_WEIGHTS = "pytorch_model.bin"  # transformers' name, read when a Hub repo has no safetensors
FOLDER_PLOTS = ("loss.png", "metrics.png")  # training curves `zoo train` draws beside the weights
_FOLDER_FILES = (FOLDER_WEIGHTS, FOLDER_CONFIG, FOLDER_CARD, *FOLDER_PLOTS)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_folder_config(folder: Path) -> dict | None:
    """The ``config.json`` of a local RelZoo folder as a dict, or None when the folder has none.

    A config.json that is not a JSON object raises WeightsError naming the file."""
    config_path = Path(folder) / FOLDER_CONFIG
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_folder_weights(folder: Path) -> dict[str, Tensor]:
    """The state dict of a RelZoo folder: its ``model.safetensors`` (or a Hub repo's ``pytorch_model.bin``)."""
    for name in (FOLDER_WEIGHTS, HF_FALLBACK_WEIGHTS):
        if (folder / name).is_file():
            return as_state_dict(load_checkpoint(folder / name), folder / name)
    raise WeightsError(f"folder {folder} has no {FOLDER_WEIGHTS}; convert a checkpoint into it with "
                       f"`python -m zoo convert --from MAP SRC --out {folder}`")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_model_folder(out_dir: str | os.PathLike, state_dict: Mapping[str, Tensor], config: dict, card: str,
                       metadata: dict[str, str] | None = None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (the card) atomically.

    The layout ``create_model(name, weights=DIR)`` loads and the Hugging Face Hub shows; used by
    ``zoo convert``, ``zoo export`` and ``zoo train``, whose training curves come as ``extra_files``
    (file name in :data:`FOLDER_PLOTS` -> PNG bytes). Readers see the old folder or the new one, never half of one.
    """
    out_dir = Path(out_dir)
    unknown = sorted(set(extra_files or {}) - set(FOLDER_PLOTS))
    if unknown:
        raise ValueError(f"write_model_folder: extra files {unknown} are not part of the folder format "
                         f"(allowed: {', '.join(FOLDER_PLOTS)})")
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_safetensors(state_dict, tmp / FOLDER_WEIGHTS,
                         metadata={"format": "pt", "relzoo_model": str(config["model"]), **(metadata or {})})
        (tmp / FOLDER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        (tmp / FOLDER_CARD).write_text(card, encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds something other than an earlier conversion."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConversionError(f"output {out_dir} exists and is not a folder")
        entries = {p.name for p in out_dir.iterdir()}
        if entries and not (out_dir / FOLDER_CONFIG).is_file():
            raise ConversionError(f"output folder {out_dir} is not empty and not a RelZoo conversion; "
                                  f"choose another --out or empty it")
        if entries - set(_FOLDER_FILES):
            raise ConversionError(f"output folder {out_dir} holds other files ({', '.join(sorted(entries))}); "
                                  f"choose another --out")


def jsonable(value: Any) -> Any:
    """``value`` (constructor kwargs) as JSON-storable data; anything else is a ConversionError naming it."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise ConversionError(f"model kwarg value {value!r} ({type(value).__name__}) cannot be stored in config.json")


def _registered_config(name: str) -> ModelConfig | None:
    """The registry's config of ``name``, or None for a caller-built model that is not registered."""
    try:
        return model_info(name)
    except ZooError:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def model_card(name: str, config: dict, origin: str, extra_tags: Sequence[str] = ()) -> str:
    """A Hugging Face model card: YAML front matter (``library_name``, tags, ``model-index`` with the
    reported metrics of the weights this folder holds) and a body saying where the weights came from."""
    info = _registered_config(name)
    tag = _matching_weights_tag(info, config) if info is not None else None
    # Rows of the weights entry this file is (matched by sha256 or file name); otherwise only the
    # paper's rows without released weights: another entry's numbers would be misattributed.
    rows = [r for r in info.reported if r.weights == tag] if info is not None else []
    task = info.task if info is not None else None

    front: dict[str, Any] = {"library_name": "relzoo", "tags": ["relzoo", *extra_tags]}
    if task:
        front["tags"].append(_slug(task))
    if rows:
        by_dataset: dict[str, dict] = {}  # one result per dataset, its metrics together (HF's layout)
        for row in rows:
            result = by_dataset.setdefault(row.dataset, {
                "task": {"type": _slug(task or "unknown"), "name": task or "unknown"},
                "dataset": {"name": row.dataset, "type": row.dataset}, "metrics": []})
            result["metrics"].append({"type": row.metric, "name": row.metric, "value": row.value})
            if row.source and "source" not in result:
                result["source"] = {"name": row.source}
        front["model-index"] = [{"name": name, "results": list(by_dataset.values())}]

    body = [f"# {name}", "", origin, ""]
    if config.get("source_sha256"):
        body.append(f"- source sha256: `{config['source_sha256']}`")
    body += [f"- constructor kwargs: `{json.dumps(config['kwargs'])}`", "",
             "```python", "import zoo", f"model = zoo.create_model({name!r}, weights='path/to/this/folder')", "```", ""]
    if rows:
        note = (f"for the `{tag}` weights" if tag is not None
                else "by the paper, for the architecture; not measured on this file")
        body += [f"Reported metrics ({note}):", "", "| metric | value | dataset | source |", "|---|---|---|---|"]
        body += [f"| {r.metric} | {r.value} | {r.dataset} | {r.source or ''} |" for r in rows]
        body.append("")
    if "incomplete" in config:
        body += ["**Incomplete conversion** (strict=False): see `incomplete` in config.json.", ""]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)


def _matching_weights_tag(info: ModelConfig, config: dict) -> str | None:
    """The weights tag of the registry entry this file came from (same sha256, or same file name)."""
    src_name = Path(str(config.get("source", ""))).name
    for tag, entry in info.weights.items():
        if entry.sha256 and entry.sha256 == config.get("source_sha256"):
            return tag
    for tag, entry in info.weights.items():
        if entry.source and Path(entry.source).name == src_name:
            return tag
    return None
