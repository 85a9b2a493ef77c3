"""Synthetic datasets written in the original datasets' on-disk formats (RelZoo-mini, issue 10).

Five generators, one per family, each small enough to build in seconds on a laptop CPU and
laid out exactly like the real dataset, so the real readers (``zoo.data.*``) and evaluation
protocols (``zoo.eval.*``) run on them unchanged:

============== ========================================== ===================================
kind           on-disk format                              family, task
============== ========================================== ===================================
shapes-det     COCO 2017 (instances json + jpg folders)    irpe: DETR+iRPE detection (3 classes)
shapes-reid    Market-1501 (pid/camera in file names)      rga: person re-id (RGA-SC)
moving-shapes  Something-Something v1 (frame folders +     rsa: video classification (8 classes
               ``<video_dir> <num_frames> <label>`` lists)  that need temporal order)
shapes-cls     ImageNet class folders (wnid-like names)    sasa: image classification (10 classes)
raised-hands   COCO 2017, one category "hand-raising"      rpa: hand-raising detection
============== ========================================== ===================================

Determinism: every sample is drawn from its own ``numpy`` generator seeded by
``(seed, kind, split, index)``, images are written with fixed encoder settings (baseline JPEG,
quality 90, 4:2:0, no EXIF or timestamps) and JSON with sorted keys, so the same arguments give
the same bytes (with the same Pillow/libjpeg build) whatever else was generated before, and a
split generated alone equals the same split generated with ``split='all'``.

Each output folder holds ``synthetic.json`` (kind, per-split seed/size/counts and, for the
evaluation split, the chance level of the task's metrics in percent), which also keeps the
generator from writing into a folder it did not write.

Modules: ``draw`` (seeding, colours, shapes), ``layout`` (the output folder and its marker, the
COCO writers), one per dataset format: ``detection`` (shapes-det, raised-hands), ``reid``,
``video``, ``classification``; this package holds the table of kinds and the entry points.

Usage::

    from zoo.data.synthetic import make_dataset
    root = make_dataset("shapes-det", Path("data/shapes-det"), split="all", seed=0, size="default")

    python -m zoo data make shapes-det --out data/shapes-det [--split val] [--seed 0] [--size tiny]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from zoo.data.synthetic.classification import CLS_CLASSES, CLS_WNIDS, make_shapes_cls
from zoo.data.synthetic.detection import DET_CATEGORIES, HAND_CATEGORIES, make_raised_hands, make_shapes_det
from zoo.data.synthetic.layout import MARKER, SIZES, SPLITS, _splits
from zoo.data.synthetic.reid import _expected_random_ap, make_shapes_reid  # noqa: F401  (tests check the chance level)
from zoo.data.synthetic.video import VIDEO_CLASSES, make_moving_shapes
from zoo.errors import ConfigError, DatasetError

__all__ = ["DATASETS", "SUMMARIES", "SIZES", "SPLITS", "MARKER", "make_dataset", "dataset_info", "summary",
           "DET_CATEGORIES", "HAND_CATEGORIES", "VIDEO_CLASSES", "CLS_CLASSES", "CLS_WNIDS"]


#: kind -> generator ``f(out, split='all', seed=0, size='default') -> Path``; each docstring states
#: the layout and the chance level of the task.
DATASETS: dict[str, Callable[..., Path]] = {
    "shapes-det": make_shapes_det,
    "shapes-reid": make_shapes_reid,
    "moving-shapes": make_moving_shapes,
    "shapes-cls": make_shapes_cls,
    "raised-hands": make_raised_hands,
}


#: kind -> what it holds, in one line (``python -m zoo data make --help``).
SUMMARIES = {
    "shapes-det": "COCO 2017 detection of circles/squares/triangles (DETR+iRPE mini)",
    "shapes-reid": "Market-1501 person re-id of synthetic pedestrians (RGA-SC mini)",
    "moving-shapes": "Something-Something v1 frame folders, 8 temporal-order classes (RSANet mini)",
    "shapes-cls": "ImageNet class folders, 10 shape classes (SASA mini)",
    "raised-hands": "COCO 2017 detection of raised hands in classroom scenes (hand-raising RPA mini)",
}


def make_dataset(kind: str, out: Path, split: str = "all", seed: int = 0, size: str = "default") -> Path:
    """Generate the synthetic dataset ``kind`` (a key of :data:`DATASETS`) into ``out``; returns ``out``.

    ``split``: 'all' (train and val), 'train' or 'val'. ``seed``: non-negative int; the same arguments
    give the same bytes. ``size``: 'default' (trains a small model above chance in minutes) or 'tiny'
    (tens of samples, for tests). ``out`` must be new, empty, or a folder this function wrote for
    the same kind (then only the requested split's files are replaced).
    """
    if kind not in DATASETS:
        raise ConfigError(f"unknown synthetic dataset kind {kind!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[kind](Path(out), split=split, seed=seed, size=size)


def dataset_info(out: Path) -> dict:
    """The ``synthetic.json`` of a generated folder: kind, and per split its seed, size, counts, chance."""
    marker = Path(out) / MARKER
    if not marker.is_file():
        raise DatasetError(f"expected {marker} (written by `python -m zoo data make`); "
                           f"{out} is not a synthetic dataset")
    return json.loads(marker.read_text(encoding="utf-8"))


def summary(out: Path, split: str = "all") -> list[str]:
    """One line per generated split of ``split`` in ``out``: kind, seed, size, counts and chance levels."""
    info = dataset_info(out)
    lines = []
    for name in _splits(split):
        entry = info["splits"][name]
        counts = ", ".join(f"{v} {k}" for k, v in sorted(entry["counts"].items()))
        chance = entry.get("chance")
        chance_text = ("; chance " + ", ".join(f"{k} {v:g}%" for k, v in sorted(chance.items()))) if chance else ""
        lines.append(f"{info['kind']} {name} (seed {entry['seed']}, {entry['size']}): {counts}{chance_text}")
    return lines
