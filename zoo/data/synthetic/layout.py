"""The output folder of a synthetic dataset: its ``synthetic.json`` marker, the argument checks, and
the COCO-format writers shared by shapes-det and raised-hands.

The marker records the kind and, per split, its seed, size, counts and (for the evaluation split)
the chance level of the task's metrics. It is also the safety catch: a non-empty folder without it
is never written into, and only the paths a split owns are replaced when a split is generated again.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from zoo.data.synthetic.draw import _rng, _save_jpeg, _write_json
from zoo.errors import ConfigError, DatasetError
from zoo.paths import progress_bar

SIZES = ("default", "tiny")
SPLITS = ("all", "train", "val")
MARKER = "synthetic.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Sizes:
    default: dict
    tiny: dict


def _splits(split: str) -> tuple[str, ...]:
    return ("train", "val") if split == "all" else (split,)


def _prepare(out: Path, kind: str, split: str, seed: int, size: str, owned: Callable[[str], list[Path]]) -> dict:
    """Check the arguments, create ``out`` (refusing a foreign non-empty folder), remove what the splits
    being generated own (``owned(split) -> paths``) and write the marker; return the marker's content."""
    _check_common(split, seed, size)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DatasetError(f"{marker} is not valid JSON ({exc}); remove the folder {out} to regenerate") from exc
        if info.get("kind") != kind:
            raise DatasetError(f"{out} holds the synthetic dataset '{info.get('kind')}'; refusing to write "
                               f"'{kind}' into it (choose another --out)")
    elif any(out.iterdir()):
        raise DatasetError(f"{out} is not empty and holds no {MARKER} (it is not a folder this generator wrote); "
                           "choose an empty or new folder for --out")
    else:
        info = {"format_version": FORMAT_VERSION, "kind": kind, "splits": {}}
    for s in _splits(split):
        info["splits"].pop(s, None)
        for path in owned(s):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    # written first, so that a run stopped half-way leaves a folder the next run may clean up
    _write_json(out / MARKER, info)
    return info


def _finish(out: Path, info: dict, split: str, seed: int, size: str, counts: dict,
            chance: Optional[dict] = None) -> None:
    entry = {"seed": int(seed), "size": size, "counts": counts}
    if chance is not None:
        entry["chance"] = {k: round(float(v), 4) for k, v in chance.items()}
    info["splits"][split] = entry
    _write_json(out / MARKER, info)


def _check_common(split: str, seed: int, size: str) -> None:
    """The arguments every generator takes (its kind is checked by ``make_dataset``)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if size not in SIZES:
        raise ConfigError(f"size must be one of {SIZES}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")


# =============================================================================================
# COCO-format writers shared by shapes-det and raised-hands


def _coco_split_paths(out: Path, split: str) -> list[Path]:
    return [out / f"{split}2017", out / "annotations" / f"instances_{split}2017.json"]


def _write_coco(out: Path, split: str, categories: list[dict], images: list[dict], annotations: list[dict]) -> None:
    (out / "annotations").mkdir(exist_ok=True)
    data = {
        "info": {"description": "RelZoo synthetic dataset (zoo.data.synthetic)", "version": str(FORMAT_VERSION)},
        "licenses": [],
        "categories": categories,
        "images": images,
        "annotations": annotations,
    }
    # compact like the real COCO files; sorted keys keep the bytes stable
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    (out / "annotations" / f"instances_{split}2017.json").write_text(text, encoding="utf-8")


def _coco_annotation(ann_id: int, image_id: int, category_id: int, box) -> dict:
    x, y, w, h, area = box
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "bbox": [float(x), float(y), float(w), float(h)], "area": float(area)}


def _coco_generate(out: Path, kind: str, split: str, seed: int, count: int, categories: list[dict],
                   render: Callable) -> dict:
    """Render ``count`` images with ``render(rng) -> (PIL image, [(category_id, box), ...])`` into COCO layout."""
    folder = out / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in progress_bar(range(count), desc=f"{kind} {split}", unit="image"):
        image_id = index + 1
        image, objects = render(_rng(seed, kind, split, index))
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(image, folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for category_id, box in objects:
            annotations.append(_coco_annotation(len(annotations) + 1, image_id, category_id, box))
    _write_coco(out, split, categories, images, annotations)
    return {"images": len(images), "boxes": len(annotations)}


def _make_coco_dataset(out: Path, kind: str, split: str, seed: int, size: str, sizes: _Sizes,
                       categories: list[dict], render: Callable) -> Path:
    """A COCO-format detection dataset (shapes-det, raised-hands): each split's images from ``render``;
    chance AP 0 on val (random boxes)."""
    out = Path(out)
    info = _prepare(out, kind, split, seed, size, lambda s: _coco_split_paths(out, s))
    for s in _splits(split):
        counts = _coco_generate(out, kind, s, seed, getattr(sizes, size)[s], categories, render)
        _finish(out, info, s, seed, size, counts, {"AP": 0.0} if s == "val" else None)
    return out
