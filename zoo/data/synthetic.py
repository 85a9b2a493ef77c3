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
evaluation split, the chance level of the task's metrics in percent). The file is also the
safety catch: a non-empty folder without it is never written into, and only the paths a split
owns are replaced when a split is generated again.

Usage::

    from zoo.data.synthetic import make_dataset
    root = make_dataset("shapes-det", Path("data/shapes-det"), split="all", seed=0, size="default")

    python -m zoo data make shapes-det --out data/shapes-det [--split val] [--seed 0] [--size tiny]
"""
from __future__ import annotations

import colorsys
import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from zoo.errors import DatasetError

__all__ = ["DATASETS", "SUMMARIES", "SIZES", "SPLITS", "MARKER", "make_dataset", "dataset_info", "summary",
           "DET_CATEGORIES", "HAND_CATEGORIES", "VIDEO_CLASSES", "CLS_CLASSES", "CLS_WNIDS"]

SIZES = ("default", "tiny")
SPLITS = ("all", "train", "val")
MARKER = "synthetic.json"
FORMAT_VERSION = 1

# Fixed encoder settings: the same pixels always give the same file bytes.
_JPEG = dict(format="JPEG", quality=90, subsampling=2, optimize=False, progressive=False)


# =============================================================================================
# Seeding, colours, drawing helpers


def _key(part) -> int:
    """A stable non-negative integer for a seed-sequence entry (str hashed with crc32, not hash())."""
    if isinstance(part, str):
        return zlib.crc32(part.encode("utf-8"))
    return int(part)


def _rng(seed: int, *keys) -> np.random.Generator:
    """An independent generator for ``(seed, *keys)``; keys are strings or non-negative ints."""
    return np.random.default_rng(np.random.SeedSequence([int(seed)] + [_key(k) for k in keys]))


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _hsv(rng: np.random.Generator, s=(0.45, 1.0), v=(0.35, 1.0)) -> tuple[int, int, int]:
    """A random colour with saturation / value in the given ranges, as an 8-bit RGB tuple."""
    r, g, b = colorsys.hsv_to_rgb(_uniform(rng, 0.0, 1.0), _uniform(rng, *s), _uniform(rng, *v))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _luma(colour) -> float:
    r, g, b = colour[:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrasting(rng: np.random.Generator, against: float, min_diff: float = 60.0, **hsv) -> tuple[int, int, int]:
    """A random colour whose luma differs from ``against`` by at least ``min_diff`` (so it stays visible)."""
    colour = _hsv(rng, **hsv)
    for _ in range(50):
        if abs(_luma(colour) - against) >= min_diff:
            return colour
        colour = _hsv(rng, **hsv)
    # dark or light extreme, whichever is farther from the background
    return (235, 235, 235) if against < 128 else (20, 20, 20)


def _gradient(rng: np.random.Generator, height: int, width: int, lo: float = 40, hi: float = 215) -> np.ndarray:
    """(height, width, 3) float32 background: a linear blend of two random colours along a random direction."""
    c0 = rng.uniform(lo, hi, size=3).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-50, 50, size=3), 0, 255).astype(np.float32)
    angle = _uniform(rng, 0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs - width / 2) * math.cos(angle) / width + (ys - height / 2) * math.sin(angle) / height + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t


def _with_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Add Gaussian pixel noise; (H, W, 3) float or uint8 -> uint8."""
    noisy = image.astype(np.float32) + rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _save_jpeg(image: Image.Image, path: Path) -> None:
    image.save(path, **_JPEG)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of radius ``r`` (centre to farthest point) rotated by ``angle`` (rad).

    Angles grow clockwise on screen (image y points down).
    """
    def rotate(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    if kind in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind]
        return rotate([(math.cos(2 * math.pi * i / n - math.pi / 2), math.sin(2 * math.pi * i / n - math.pi / 2))
                       for i in range(n)])
    if kind == "star":
        return rotate([((1.0 if i % 2 == 0 else 0.45) * math.cos(math.pi * i / 5 - math.pi / 2),
                        (1.0 if i % 2 == 0 else 0.45) * math.sin(math.pi * i / 5 - math.pi / 2)) for i in range(10)])
    if kind == "cross":
        a = 0.33
        return rotate([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                       (-1, -a), (-a, -a)])
    if kind == "arrow":  # no rotational symmetry: its turning direction is visible
        return rotate([(1, 0), (0.1, -0.75), (0.1, -0.3), (-1, -0.3), (-1, 0.3), (0.1, 0.3), (0.1, 0.75)])
    if kind == "ell":  # an L, no symmetry at all
        return rotate([(-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.7, 0.5), (0.7, 1), (-0.7, 1)])
    raise ValueError(f"unknown polygon kind {kind!r}")


def _shape_mask(kind: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float = 0.0,
                value: int = 255) -> Image.Image:
    """An 'L' mask (``size`` = (width, height)) with the shape drawn in ``value`` on 0."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=value)
    elif kind == "ring":
        draw.ellipse(box, fill=value)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif kind == "crescent":
        draw.ellipse(box, fill=value)
        ox, oy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
        draw.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r], fill=0)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=value)
    return mask


def _mask_box(mask: np.ndarray) -> Optional[tuple[int, int, int, int, int]]:
    """(x, y, w, h, area) of the non-zero pixels of a 2-D mask (COCO xywh, pixel-inclusive), None if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1, int(xs.size)


def _texture(rng: np.random.Generator, width: int, height: int, base, other) -> Image.Image:
    """An RGB image filled with a random texture in two colours: solid, stripes, checker or dots."""
    kind = rng.choice(["solid", "stripes", "checker", "dots"])
    base_arr = np.empty((height, width, 3), np.uint8)
    base_arr[:] = base
    if kind == "solid":
        return Image.fromarray(base_arr)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    period = _uniform(rng, 4, 10)
    if kind == "stripes":
        angle = _uniform(rng, 0, math.pi)
        on = ((xs * math.cos(angle) + ys * math.sin(angle)) % period) < period / 2
    elif kind == "checker":
        on = ((np.floor(xs / period) + np.floor(ys / period)) % 2) == 0
    else:
        on = ((xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2) < (period / 3.5) ** 2
    base_arr[on] = other
    return Image.fromarray(base_arr)


# =============================================================================================
# Output folder handling


@dataclass(frozen=True)
class _Sizes:
    default: dict
    tiny: dict


def _splits(split: str) -> tuple[str, ...]:
    return ("train", "val") if split == "all" else (split,)


def _prepare(out: Path, kind: str, split: str, seed: int, size: str, owned: Callable[[str], list[Path]]) -> dict:
    """Check the arguments, create ``out`` (refusing a foreign non-empty folder), remove what the splits
    being generated own (``owned(split) -> paths``) and write the marker; return the marker's content."""
    _check_common(kind, split, seed, size)
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


def _check_common(kind: str, split: str, seed: int, size: str) -> None:
    if kind not in DATASETS:
        raise ValueError(f"unknown synthetic dataset kind {kind!r}; known: {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


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
    for index in range(count):
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


# =============================================================================================
# shapes-det


#: COCO-style categories of shapes-det (ids start at 1 as COCO's; DETR needs ``num_classes >= 4``).
DET_CATEGORIES = [{"id": 1, "name": "circle", "supercategory": "shape"},
                  {"id": 2, "name": "square", "supercategory": "shape"},
                  {"id": 3, "name": "triangle", "supercategory": "shape"}]
_DET_SIZES = _Sizes(default={"train": 2400, "val": 400}, tiny={"train": 12, "val": 8})


def _render_shapes_det(rng: np.random.Generator):
    width, height = int(rng.integers(96, 161)), int(rng.integers(96, 161))
    background = _gradient(rng, height, width)
    image = Image.fromarray(background.astype(np.uint8))
    bg_luma = float(_luma(background.reshape(-1, 3).mean(0)))
    placed, objects = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):
            category = int(rng.integers(1, 4))
            r = _uniform(rng, 7, 0.24 * min(width, height))
            cx, cy = _uniform(rng, r + 1, width - r - 1), _uniform(rng, r + 1, height - r - 1)
            # keep objects apart (2 px gap) so every box is the whole visible shape
            if all(abs(cx - px) > r + pr + 2 or abs(cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        name = DET_CATEGORIES[category - 1]["name"]
        angle = _uniform(rng, 0, 2 * math.pi)
        mask = _shape_mask(name, (width, height), cx, cy, r, angle)
        box = _mask_box(np.asarray(mask))
        if box is None:
            continue
        image.paste(_contrasting(rng, bg_luma), mask=mask)
        objects.append((category, box))
    pixels = _with_noise(rng, np.asarray(image), sigma=_uniform(rng, 2, 8))
    return Image.fromarray(pixels), objects


def make_shapes_det(out: Path, split: str = "all", seed: int = 0, size: str = "default") -> Path:
    """shapes-det: 1-4 coloured circles / squares / triangles (random colour, size, rotation) on
    gradient backgrounds, images 96-160 px a side, COCO 2017 layout::

        DIR/annotations/instances_{train,val}2017.json   categories 1 circle, 2 square, 3 triangle
        DIR/{train,val}2017/<image_id:012d>.jpg

    Boxes are the exact extents of each shape's pixels (objects never overlap); ``area`` is its pixel
    count. Default 2400 train / 400 val images, tiny 12 / 8.

    Chance: a detector that predicts boxes at random scores box AP ~ 0; the colour says nothing
    about the class, so a box-perfect detector guessing the class gets about 1/3 of its AP.
    """
    return _make_coco_dataset(out, "shapes-det", split, seed, size, _DET_SIZES, DET_CATEGORIES, _render_shapes_det)


# =============================================================================================
# raised-hands


HAND_CATEGORIES = [{"id": 1, "name": "hand-raising", "supercategory": "person"}]
_HAND_SIZES = _Sizes(default={"train": 1500, "val": 300}, tiny={"train": 10, "val": 6})
_SKIN = [(241, 194, 160), (224, 172, 130), (198, 134, 90), (141, 85, 56), (92, 58, 40)]
_HAIR = [(30, 25, 20), (70, 45, 25), (140, 100, 50), (200, 170, 110), (120, 120, 120)]
# arm poses: (elbow offset, hand offset from elbow) in head-radius units, x pointing away from the body
_ARM_POSES = {
    "down": ((0.3, 1.8), (0.3, 1.6)),
    "raised": ((0.25, -1.8), (0.0, -1.7)),        # straight up
    "raised_bent": ((1.3, -1.0), (0.15, -1.8)),   # elbow out, forearm up
    "sideways": ((1.8, 0.2), (1.6, 0.2)),          # negatives: arm out but not up
    "head": ((1.4, -1.1), (-0.9, -0.5)),           # hand on the head
    "chin": ((0.6, 1.8), (-0.55, -2.1)),           # chin resting on the hand
}
_NEGATIVE_POSES = ["down", "down", "down", "sideways", "head", "chin"]


class _Canvas:
    """Draws on the RGB image and, in step, on an instance map (0 = nothing countable) so that each
    raised hand's VISIBLE pixels are known after later strokes cover parts of it."""

    def __init__(self, image: Image.Image):
        self.image = image
        self.ids = Image.new("I", image.size, 0)
        self.draw = ImageDraw.Draw(image)
        self.draw_ids = ImageDraw.Draw(self.ids)

    def line(self, points, fill, width: int, ident: int = 0):
        self.draw.line(points, fill=fill, width=width, joint="curve")
        self.draw_ids.line(points, fill=ident, width=width, joint="curve")

    def ellipse(self, box, fill, ident: int = 0):
        self.draw.ellipse(box, fill=fill)
        self.draw_ids.ellipse(box, fill=ident)

    def rectangle(self, box, fill, ident: int = 0):
        self.draw.rectangle(box, fill=fill)
        self.draw_ids.rectangle(box, fill=ident)

    def polygon(self, points, fill, ident: int = 0):
        self.draw.polygon(points, fill=fill)
        self.draw_ids.polygon(points, fill=ident)


def _draw_student(canvas: _Canvas, rng: np.random.Generator, x: float, y_shoulder: float, u: float,
                  next_id: int) -> list[int]:
    """One stick-figure student, shoulders at (x, y_shoulder), head radius ``u`` px; returns the
    instance ids given to raised forearms (starting at ``next_id``)."""
    shirt = _hsv(rng, s=(0.3, 1.0), v=(0.3, 0.95))
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    arm_width = max(2, int(round(0.55 * u)))
    raised_side = int(rng.choice([-1, 1])) if rng.random() < 0.32 else 0
    poses = {}
    for side in (-1, 1):
        if side == raised_side:
            poses[side] = str(rng.choice(["raised", "raised_bent"]))
        else:
            poses[side] = str(rng.choice(_NEGATIVE_POSES))
    # torso
    canvas.polygon([(x - 1.1 * u, y_shoulder - 0.3 * u), (x + 1.1 * u, y_shoulder - 0.3 * u),
                    (x + 0.95 * u, y_shoulder + 3.2 * u), (x - 0.95 * u, y_shoulder + 3.2 * u)], shirt)
    ids, hands = [], {}
    for side in (-1, 1):
        pose = poses[side]
        (ex, ey), (hx, hy) = _ARM_POSES[pose]
        tilt = _uniform(rng, -0.25, 0.25)  # radians: a little variety in every pose
        c, s = math.cos(tilt), math.sin(tilt)
        ex, ey = ex * c - ey * s, ex * s + ey * c
        hx, hy = hx * c - hy * s, hx * s + hy * c
        shoulder = (x + side * 0.95 * u, y_shoulder)
        elbow = (shoulder[0] + side * ex * u, shoulder[1] + ey * u)
        hand = (elbow[0] + side * hx * u, elbow[1] + hy * u)
        ident = 0
        if pose.startswith("raised"):
            ident = next_id + len(ids)
            ids.append(ident)
        canvas.line([shoulder, elbow], shirt, arm_width)
        canvas.line([elbow, hand], shirt if pose != "chin" else skin, arm_width, ident)
        hands[side] = hand
        hr = 0.5 * u
        canvas.ellipse([hand[0] - hr, hand[1] - hr, hand[0] + hr, hand[1] + hr], skin, ident)
    # head (hands on the head stay visible in front of it: redraw them after)
    head_y = y_shoulder - 1.5 * u
    hair = _HAIR[int(rng.integers(len(_HAIR)))]
    canvas.ellipse([x - u, head_y - u, x + u, head_y + u], skin)
    canvas.ellipse([x - u, head_y - 1.15 * u, x + u, head_y + 0.1 * u], hair)
    canvas.ellipse([x - 0.8 * u, head_y - 0.45 * u, x + 0.8 * u, head_y + 0.95 * u], skin)
    for side in (-1, 1):
        if poses[side] in ("head", "chin"):
            hand, hr = hands[side], 0.5 * u
            canvas.ellipse([hand[0] - hr, hand[1] - hr, hand[0] + hr, hand[1] + hr], skin)
    return ids


def _render_raised_hands(rng: np.random.Generator):
    height = int(rng.integers(112, 145))
    width = int(round(height * 1.6))
    wall = np.array(_hsv(rng, s=(0.05, 0.3), v=(0.7, 0.95)), np.float32)
    floor = np.array(_hsv(rng, s=(0.1, 0.4), v=(0.35, 0.6)), np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    floor_y = int(0.6 * height)
    pixels[:floor_y] = wall
    pixels[floor_y:] = floor
    image = Image.fromarray(pixels.astype(np.uint8))
    canvas = _Canvas(image)
    # the board at the front of the class (seen from behind the teacher)
    bx0 = _uniform(rng, 0.1, 0.45) * width
    canvas.rectangle([bx0, 0.03 * height, bx0 + _uniform(rng, 0.3, 0.45) * width, 0.16 * height],
                     (int(rng.integers(20, 60)), int(rng.integers(50, 90)), int(rng.integers(30, 60))))
    desk = _hsv(rng, s=(0.3, 0.7), v=(0.3, 0.6))
    raised_ids = []
    # back row first (smaller, higher), then the front row over it
    for y_frac, u_frac, count in ((0.40, 0.055, int(rng.integers(3, 6))), (0.74, 0.07, int(rng.integers(3, 5)))):
        u = u_frac * height
        y = y_frac * height + _uniform(rng, -0.02, 0.02) * height
        spacing = width / count
        offset = _uniform(rng, 0.35, 0.65)
        for k in range(count):
            x = (k + offset) * spacing + _uniform(rng, -0.12, 0.12) * spacing
            raised_ids += _draw_student(canvas, rng, x, y + _uniform(rng, -0.15, 0.15) * u, u,
                                        next_id=len(raised_ids) + 1)
        top = y + 2.0 * u
        canvas.rectangle([0, top, width, top + 1.3 * u], desk)
        for k in range(count + 1):  # desk legs
            lx = (k + offset - 0.5) * spacing
            canvas.rectangle([lx - 0.2 * u, top + 1.3 * u, lx + 0.2 * u, top + 2.8 * u], desk)
    ids = np.asarray(canvas.ids)
    objects = []
    for ident in raised_ids:
        box = _mask_box(ids == ident)
        if box is not None and box[4] >= 6:  # a hand hidden almost entirely is not annotated
            objects.append((1, box))
    pixels = _with_noise(rng, np.asarray(image), sigma=_uniform(rng, 2, 6))
    return Image.fromarray(pixels), objects


def make_raised_hands(out: Path, split: str = "all", seed: int = 0, size: str = "default") -> Path:
    """raised-hands: classroom-like scenes (wall, board, two rows of desks) with 6-9 stick-figure
    students; each raises one arm (straight, or bent with the elbow out) with probability 0.32, the
    other arms hang, rest on the desk, point sideways, touch the head or hold the chin (negatives).
    COCO 2017 layout, one category ``{"id": 1, "name": "hand-raising"}``; a box covers the visible
    pixels of a raised forearm and hand. Images 179-230 x 112-144 px. Default 1500 train / 300 val,
    tiny 10 / 6.

    Chance: a detector placing random boxes scores AP ~ 0.
    """
    return _make_coco_dataset(out, "raised-hands", split, seed, size, _HAND_SIZES, HAND_CATEGORIES,
                              _render_raised_hands)


# =============================================================================================
# shapes-reid (Market-1501 layout)


_REID_SIZES = _Sizes(default={"train_ids": 160, "test_ids": 160, "distractors": 80, "junk": 40},
                     tiny={"train_ids": 6, "test_ids": 6, "distractors": 4, "junk": 2})
_REID_HEIGHT, _REID_WIDTH = 128, 64
_NUM_CAMERAS = 6
_CLOTHES = [(20, 20, 20), (235, 235, 235), (128, 128, 128), (200, 30, 30), (110, 20, 30), (240, 130, 20),
            (235, 215, 40), (40, 160, 50), (20, 80, 40), (40, 90, 210), (20, 30, 90), (130, 50, 160),
            (240, 140, 180), (120, 75, 40), (215, 195, 150), (40, 180, 190)]
_PATTERNS = ("plain", "hstripes", "vstripes", "twotone", "logo")
_REID_YS, _REID_XS = np.mgrid[0:_REID_HEIGHT, 0:_REID_WIDTH].astype(np.float32)


@dataclass(frozen=True)
class _Person:
    top: int          # index into _CLOTHES
    pattern: str      # one of _PATTERNS
    pattern_colour: int
    sleeves: str      # long | short
    bottom: int
    bottom_type: str  # trousers | shorts | skirt
    hair: int
    long_hair: bool
    bag: str          # none | side | backpack
    bag_colour: int
    skin: int
    build: float      # width factor

    def key(self) -> tuple:
        """What makes two people look different at a glance (identities are unique in it)."""
        return (self.top, self.pattern, self.pattern_colour if self.pattern != "plain" else -1, self.bottom,
                self.bottom_type, self.bag)


def _random_person(rng: np.random.Generator) -> _Person:
    top = int(rng.integers(len(_CLOTHES)))
    pattern_colour = int(rng.integers(len(_CLOTHES) - 1))
    pattern_colour += pattern_colour >= top  # never the top colour itself
    return _Person(top=top, pattern=str(rng.choice(_PATTERNS)), pattern_colour=pattern_colour,
                   sleeves=str(rng.choice(["long", "short"])), bottom=int(rng.integers(len(_CLOTHES))),
                   bottom_type=str(rng.choice(["trousers", "trousers", "shorts", "skirt"])),
                   hair=int(rng.integers(len(_HAIR))), long_hair=bool(rng.random() < 0.35),
                   bag=str(rng.choice(["none", "none", "side", "backpack"])),
                   bag_colour=int(rng.integers(len(_CLOTHES))),
                   skin=int(rng.integers(len(_SKIN))), build=_uniform(rng, 0.85, 1.15))


@dataclass(frozen=True)
class _Camera:
    wall: tuple
    floor: tuple
    horizon: float     # fraction of the height where the floor starts
    tiles: float       # floor tile period in px (0 = plain floor)
    gain: tuple        # per-channel lighting gain
    height_frac: tuple  # person height as a fraction of the image height (min, max)
    blur: float        # downscale factor simulating a low-resolution camera (1 = sharp)


def _cameras(seed: int) -> list[_Camera]:
    rng = _rng(seed, "shapes-reid", "cameras")
    cameras = []
    for _ in range(_NUM_CAMERAS):
        brightness = _uniform(rng, 0.75, 1.2)
        cast = rng.uniform(-0.1, 0.1, size=3)
        lo = _uniform(rng, 0.72, 0.85)
        cameras.append(_Camera(wall=_hsv(rng, s=(0.0, 0.35), v=(0.3, 0.9)), floor=_hsv(rng, s=(0.0, 0.3), v=(0.2, 0.7)),
                               horizon=_uniform(rng, 0.45, 0.8), tiles=float(rng.choice([0.0, _uniform(rng, 6, 14)])),
                               gain=tuple(float(brightness * (1 + c)) for c in cast), height_frac=(lo, lo + 0.12),
                               blur=float(rng.choice([1.0, 1.0, 0.6, 0.45]))))
    return cameras


def _draw_person(image: Image.Image, rng: np.random.Generator, person: _Person, camera: _Camera) -> None:
    """Draw ``person`` on ``image`` (64 x 128) in a random walking pose, scale and position."""
    draw = ImageDraw.Draw(image)
    height = _uniform(rng, *camera.height_frac) * _REID_HEIGHT
    foot_y = _REID_HEIGHT - _uniform(rng, 1, 0.98 * _REID_HEIGHT - height)
    top_y = foot_y - height
    cx = _REID_WIDTH / 2 + _uniform(rng, -4, 4)
    skin, hair = _SKIN[person.skin], _HAIR[person.hair]
    top, bottom = _CLOTHES[person.top], _CLOTHES[person.bottom]
    head_r = 0.065 * height
    head_y = top_y + head_r
    shoulder_y = top_y + 2 * head_r + 0.03 * height
    hip_y = top_y + 0.53 * height
    knee_y = (hip_y + foot_y) / 2
    shoulder_half, hip_half = 0.13 * height * person.build, 0.1 * height * person.build
    stride = _uniform(rng, -0.09, 0.09) * height  # walking phase
    swing = _uniform(rng, -0.06, 0.06) * height

    if person.long_hair:
        draw.rectangle([cx - 1.05 * head_r, head_y, cx + 1.05 * head_r, shoulder_y + 0.07 * height], fill=hair)
    if person.bag == "backpack":  # peeks out on both sides behind the torso
        draw.rectangle([cx - shoulder_half - 0.025 * height, shoulder_y + 0.03 * height,
                        cx + shoulder_half + 0.025 * height, hip_y - 0.06 * height], fill=_CLOTHES[person.bag_colour])
    # legs
    leg_w = max(2, int(round(0.075 * height * person.build)))
    for side, step in ((-1, -stride), (1, stride)):
        hip = (cx + side * 0.5 * hip_half, hip_y)
        foot = (cx + side * 0.5 * hip_half + step, foot_y - 0.02 * height)
        knee = ((hip[0] + foot[0]) / 2, knee_y)
        if person.bottom_type == "trousers":
            draw.line([hip, foot], fill=bottom, width=leg_w)
        else:
            draw.line([hip, knee], fill=bottom, width=leg_w)
            draw.line([knee, foot], fill=skin, width=max(1, leg_w - 1))
        draw.ellipse([foot[0] - 0.04 * height, foot[1] - 0.02 * height, foot[0] + 0.04 * height,
                      foot[1] + 0.02 * height], fill=(25, 25, 25))
    if person.bottom_type == "skirt":
        draw.polygon([(cx - hip_half, hip_y - 1), (cx + hip_half, hip_y - 1), (cx + 1.5 * hip_half, knee_y),
                      (cx - 1.5 * hip_half, knee_y)], fill=bottom)
    # torso with its pattern
    torso = [(cx - shoulder_half, shoulder_y), (cx + shoulder_half, shoulder_y), (cx + hip_half, hip_y),
             (cx - hip_half, hip_y)]
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).polygon(torso, fill=255)
    pattern = np.empty((_REID_HEIGHT, _REID_WIDTH, 3), np.uint8)
    pattern[:] = top
    ys, xs = _REID_YS, _REID_XS
    period = max(3.0, 0.05 * height)
    other = _CLOTHES[person.pattern_colour]
    if person.pattern == "hstripes":
        pattern[((ys - shoulder_y) % period) < period / 2] = other
    elif person.pattern == "vstripes":
        pattern[((xs - cx) % period) < period / 2] = other
    elif person.pattern == "twotone":
        pattern[ys > (shoulder_y + hip_y) / 2] = other
    elif person.pattern == "logo":
        logo = 0.05 * height
        mid = (shoulder_y + hip_y) / 2 - 0.02 * height
        pattern[(abs(ys - mid) < logo) & (abs(xs - cx) < logo)] = other
    image.paste(Image.fromarray(pattern), mask=mask)
    # arms
    arm_w = max(2, int(round(0.055 * height)))
    for side, s in ((-1, swing), (1, -swing)):
        shoulder = (cx + side * (shoulder_half - 0.02 * height), shoulder_y + 0.02 * height)
        hand = (cx + side * (shoulder_half + 0.03 * height) + s, hip_y + 0.02 * height)
        elbow = ((shoulder[0] + hand[0]) / 2, (shoulder[1] + hand[1]) / 2)
        if person.sleeves == "long":
            draw.line([shoulder, hand], fill=top, width=arm_w)
        else:
            draw.line([shoulder, elbow], fill=top, width=arm_w)
            draw.line([elbow, hand], fill=skin, width=max(1, arm_w - 1))
        draw.ellipse([hand[0] - 0.025 * height, hand[1] - 0.025 * height, hand[0] + 0.025 * height,
                      hand[1] + 0.025 * height], fill=skin)
    if person.bag == "side":
        bag = _CLOTHES[person.bag_colour]
        side = 1 if rng.random() < 0.5 else -1  # carried on either shoulder
        bx = cx + side * (hip_half + 0.05 * height)
        draw.line([(cx - side * shoulder_half * 0.8, shoulder_y), (bx, hip_y - 0.05 * height)], fill=bag,
                  width=max(1, int(0.02 * height)))
        draw.rectangle([bx - 0.06 * height, hip_y - 0.06 * height, bx + 0.06 * height, hip_y + 0.06 * height], fill=bag)
    # head and hair
    draw.ellipse([cx - 0.85 * head_r, head_y - head_r, cx + 0.85 * head_r, head_y + head_r], fill=skin)
    draw.chord([cx - 0.9 * head_r, head_y - 1.1 * head_r, cx + 0.9 * head_r, head_y + 0.4 * head_r], 180, 360,
               fill=hair)


def _reid_background(rng: np.random.Generator, camera: _Camera) -> Image.Image:
    pixels = np.empty((_REID_HEIGHT, _REID_WIDTH, 3), np.float32)
    horizon = int(round((camera.horizon + _uniform(rng, -0.05, 0.05)) * _REID_HEIGHT))
    pixels[:horizon] = camera.wall
    pixels[horizon:] = camera.floor
    if camera.tiles > 0:
        ys, xs = _REID_YS, _REID_XS
        shift = _uniform(rng, 0, camera.tiles)
        line = (((xs + shift) % camera.tiles) < 1) | (((ys + shift) % camera.tiles) < 1)
        pixels[line & (ys >= horizon)] *= 0.75
    # a random vertical structure (pole, door edge) somewhere behind the person
    px = int(rng.integers(0, _REID_WIDTH))
    pixels[:, px:px + int(rng.integers(2, 8))] = _hsv(rng, s=(0.0, 0.5), v=(0.2, 0.9))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _camera_effects(rng: np.random.Generator, image: Image.Image, camera: _Camera) -> Image.Image:
    """Lighting gain (camera + a little per image), low resolution, sensor noise."""
    gain = np.array(camera.gain, np.float32) * _uniform(rng, 0.92, 1.08)
    pixels = np.asarray(image, np.float32) * gain
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if camera.blur < 1:
        small = (max(8, int(_REID_WIDTH * camera.blur)), max(16, int(_REID_HEIGHT * camera.blur)))
        image = image.resize(small, Image.BILINEAR).resize((_REID_WIDTH, _REID_HEIGHT), Image.BILINEAR)
    return Image.fromarray(_with_noise(rng, np.asarray(image), sigma=_uniform(rng, 2, 6)))


def _render_person(rng: np.random.Generator, person: _Person, camera: _Camera, junk: bool = False) -> Image.Image:
    image = _reid_background(rng, camera)
    _draw_person(image, rng, person, camera)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if junk:  # a bad detection: a thin slice of the person stretched to the full box
        top = int(rng.integers(0, _REID_HEIGHT // 2))
        image = image.crop((0, top, _REID_WIDTH, top + _REID_HEIGHT // 4)).resize((_REID_WIDTH, _REID_HEIGHT),
                                                                                  Image.BILINEAR)
    return _camera_effects(rng, image, camera)


@dataclass(frozen=True)
class _Shot:
    """One image to write: folder, pid (-1 junk, 0 distractor), 1-based camera, how to draw it."""
    folder: str
    pid: int
    camera: int
    person: Optional[_Person]
    junk: bool = False


def _reid_plan(seed: int, size: str):
    """Identities, pids and which (identity, camera) images exist; independent of the split asked for."""
    sizes = getattr(_REID_SIZES, size)
    rng = _rng(seed, "shapes-reid", "identities", size)
    n_train, n_test = sizes["train_ids"], sizes["test_ids"]
    people, seen = [], set()
    while len(people) < n_train + n_test:
        person = _random_person(rng)
        if person.key() not in seen:
            seen.add(person.key())
            people.append(person)
    # Market-1501 numbers train and test people from one range, interleaved
    pids = rng.permutation(n_train + n_test) + 1
    train = [(int(pids[i]), people[i]) for i in range(n_train)]
    test = [(int(pids[n_train + i]), people[n_train + i]) for i in range(n_test)]

    def cameras_of(min_per_camera: int):
        chosen = np.sort(rng.choice(_NUM_CAMERAS, size=int(rng.integers(2, 5)), replace=False)) + 1
        return [(int(c), int(rng.integers(min_per_camera, 5))) for c in chosen]

    # >= 2 images per camera, so every identity has the K >= 4 images a P x K triplet batch wants
    train_shots = [_Shot("bounding_box_train", pid, cam, person)
                   for pid, person in train for cam, count in cameras_of(2) for _ in range(count)]
    query, gallery = [], []
    for pid, person in test:
        cams = cameras_of(2)  # >= 2 images per camera: one can be a query, one stays in the gallery
        query_cams = set(rng.choice([c for c, _ in cams], size=min(2, len(cams)), replace=False).tolist())
        for cam, count in cams:
            for k in range(count):
                (query if k == 0 and cam in query_cams else gallery).append(_Shot(
                    "query" if k == 0 and cam in query_cams else "bounding_box_test", pid, cam, person))
    for _ in range(sizes["distractors"]):  # pid 0000: people outside the test set and background boxes
        gallery.append(_Shot("bounding_box_test", 0, int(rng.integers(1, _NUM_CAMERAS + 1)),
                             _random_person(rng) if rng.random() < 0.6 else None))
    for _ in range(sizes["junk"]):  # pid -1: fragments of test people, ignored by the protocol
        pid, person = test[int(rng.integers(len(test)))]
        gallery.append(_Shot("bounding_box_test", -1, int(rng.integers(1, _NUM_CAMERAS + 1)), person, junk=True))
    return {"train": train_shots, "val": query + gallery}, len(train), len(test)


def _expected_random_ap(n: int, m: int) -> float:
    """Expected average precision of a uniformly random ranking of ``n`` items, ``m`` of them relevant.

    E[AP] = H_n / n + (m - 1) (n - H_n) / (n (n - 1)), H_n the n-th harmonic number.
    """
    h = sum(1.0 / k for k in range(1, n + 1))
    return h / n + ((m - 1) * (n - h) / (n * (n - 1)) if n > 1 else 0.0)


def _reid_chance(shots: list[_Shot]) -> dict:
    """Rank-1 and mAP (percent) of a random ranking under the Market-1501 rules the reader applies."""
    queries = [s for s in shots if s.folder == "query"]
    gallery = [s for s in shots if s.folder == "bounding_box_test" and s.pid != -1]
    rank1, ap = [], []
    for q in queries:
        valid = [g for g in gallery if not (g.pid == q.pid and g.camera == q.camera)]
        matches = sum(g.pid == q.pid for g in valid)
        if matches:
            rank1.append(matches / len(valid))
            ap.append(_expected_random_ap(len(valid), matches))
    return {"rank1": 100 * float(np.mean(rank1)), "mAP": 100 * float(np.mean(ap))}


def make_shapes_reid(out: Path, split: str = "all", seed: int = 0, size: str = "default") -> Path:
    """shapes-reid: synthetic pedestrians, 128 x 64 px, laid out like Market-1501::

        DIR/bounding_box_train/<pid:04d>_c<cam>s<seq>_<frame:06d>_<box:02d>.jpg   (split 'train')
        DIR/query/...  DIR/bounding_box_test/...                                (split 'val')

    An identity is a unique combination of clothing: top colour, top pattern (plain, horizontal or
    vertical stripes, two-tone, logo) and its colour, bottom colour and type (trousers, shorts,
    skirt), bag (none, side bag, backpack); hair, skin, sleeves and build vary too. Six cameras
    differ in background (wall, floor tiles, horizon), lighting (gain and colour cast), scale and
    resolution; every image has its own pose, position and mirror flip. Each person is seen by 2-4
    cameras; train and test people are disjoint and their pids interleave in 1..N as Market's do.
    Queries: one image per person in up to 2 of its cameras; the gallery holds the rest plus
    distractors (pid ``0000``: other people or background) and junk (pid ``-1``: slivers of test
    people, dropped by the reader). Default 160 train / 160 test people (about 1400 train images,
    320 queries, 1230 gallery images), tiny 6 / 6.

    Chance: a random ranking scores rank-1 = mean over queries of (#matches / #valid gallery) and
    mAP = the expected AP of a random ranking, about 0.4% and 1.0% for the default test split
    (``synthetic.json`` records the exact numbers of the generated split).
    """
    out = Path(out)
    owned = {"train": [out / "bounding_box_train"], "val": [out / "query", out / "bounding_box_test"]}
    info = _prepare(out, "shapes-reid", split, seed, size, owned.get)
    shots, n_train, n_test = _reid_plan(seed, size)
    cameras = _cameras(seed)
    for s in _splits(split):
        for path in owned[s]:
            path.mkdir()
        frame = 0
        for index, shot in enumerate(shots[s]):
            rng = _rng(seed, "shapes-reid", s, index)
            camera = cameras[shot.camera - 1]
            if shot.person is None:  # a false detection: background only
                image = _camera_effects(rng, _reid_background(rng, camera), camera)
            else:
                image = _render_person(rng, shot.person, camera, junk=shot.junk)
            frame += int(rng.integers(1, 40))  # frame numbers grow like a video's, so names never collide
            pid = "-1" if shot.pid == -1 else f"{shot.pid:04d}"
            name = f"{pid}_c{shot.camera}s{int(rng.integers(1, 7))}_{frame:06d}_{int(rng.integers(1, 5)):02d}.jpg"
            _save_jpeg(image, out / shot.folder / name)
        if s == "train":
            counts = {"images": len(shots[s]), "identities": n_train}
            chance = None
        else:
            counts = {"query": sum(x.folder == "query" for x in shots[s]),
                      "gallery": sum(x.folder == "bounding_box_test" for x in shots[s]),
                      "identities": n_test, "distractors": sum(x.pid == 0 for x in shots[s]),
                      "junk": sum(x.pid == -1 for x in shots[s])}
            chance = _reid_chance(shots[s])
        _finish(out, info, s, seed, size, counts, chance)
    return out


# =============================================================================================
# moving-shapes (Something-Something v1 layout)


#: Class names in label order (labels 0..7); each pair differs only in temporal order.
VIDEO_CLASSES = ["moving left", "moving right", "growing", "shrinking", "rotating clockwise",
                 "rotating counter-clockwise", "appearing", "disappearing"]
_VIDEO_SIZES = _Sizes(default={"train": 120, "val": 30}, tiny={"train": 1, "val": 1})  # clips per class
_VIDEO_FOLDER = "20bn-something-something-v1"
_VIDEO_LISTS = {"train": "something_train_cluster.txt", "val": "something_val_cluster.txt"}
_VIDEO_FIRST_ID = {"train": 1, "val": 100001}
_FRAME_H, _FRAME_W = 72, 96
_MOVING_SHAPES = ["circle", "square", "triangle", "star", "cross", "arrow", "ell"]
_ROTATING_SHAPES = ["arrow", "ell", "triangle"]  # no symmetry that hides the turning direction


def _video_split(video_id: int) -> str:
    return "val" if video_id >= _VIDEO_FIRST_ID["val"] else "train"


def _render_clip(rng: np.random.Generator, label: int, num_frames: int) -> np.ndarray:
    """Frames (num_frames, 72, 96, 3) uint8 of one clip of class ``label``; only their order tells the class."""
    h, w = _FRAME_H, _FRAME_W
    background = _gradient(rng, h, w)
    background = background + rng.standard_normal((h, w, 3), dtype=np.float32) * 6  # static texture
    bg_luma = float(_luma(background.reshape(-1, 3).mean(0)))
    background = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    colour = _contrasting(rng, bg_luma, min_diff=70)
    name = _MOVING_SHAPES[int(rng.integers(len(_MOVING_SHAPES)))]
    base_angle = _uniform(rng, 0, 2 * math.pi)
    drift = rng.uniform(-4, 4, size=2)  # slow translation in every class, so motion alone is no cue
    r0 = r1 = _uniform(rng, 8, 13)
    x0, y0 = _uniform(rng, 20, w - 20), _uniform(rng, 20, h - 20)
    dx, spin, switch = 0.0, 0.0, None
    if label in (0, 1):  # moving left / right
        travel = _uniform(rng, 0.35, 0.55) * w
        if label == 0:
            x0, dx = _uniform(rng, r0 + 2 + travel, w - r0 - 2), -travel
        else:
            x0, dx = _uniform(rng, r0 + 2, w - r0 - 2 - travel), travel
        drift[0] = 0.0
    elif label in (2, 3):  # growing / shrinking
        small, big = _uniform(rng, 4, 7), _uniform(rng, 14, 20)
        r0, r1 = (small, big) if label == 2 else (big, small)
        x0, y0 = _uniform(rng, 22, w - 22), _uniform(rng, 22, h - 22)
    elif label in (4, 5):  # rotating clockwise / counter-clockwise (on screen)
        name = _ROTATING_SHAPES[int(rng.integers(len(_ROTATING_SHAPES)))]
        spin = math.radians(_uniform(rng, 150, 270)) * (1 if label == 4 else -1)
    else:  # appearing / disappearing around a random moment, with a short fade
        switch = _uniform(rng, 0.3, 0.7)
    distractor = None
    if rng.random() < 0.6:  # a static second shape elsewhere
        dname = _MOVING_SHAPES[int(rng.integers(len(_MOVING_SHAPES)))]
        distractor = (dname, _uniform(rng, 6, 11), _contrasting(rng, bg_luma, min_diff=50), _uniform(rng, 0, 6.3))
        dx0 = _uniform(rng, 12, w - 12)
        dy0 = _uniform(rng, 12, h - 12)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for f in range(num_frames):
        t = f / (num_frames - 1)
        frame = background.copy()
        if distractor is not None:
            dname, dr, dcol, dang = distractor
            frame.paste(dcol, mask=_shape_mask(dname, (w, h), dx0, dy0, dr, dang))
        alpha = 1.0
        if switch is not None:
            alpha = min(max((t - switch) / 0.12 + 0.5, 0.0), 1.0)
            alpha = alpha if label == 6 else 1.0 - alpha
        if alpha > 0:
            mask = _shape_mask(name, (w, h), x0 + dx * t + drift[0] * t, y0 + drift[1] * t, r0 + (r1 - r0) * t,
                               base_angle + spin * t, value=int(round(255 * alpha)))
            frame.paste(colour, mask=mask)
        frames[f] = np.asarray(frame)
    return _with_noise(rng, frames, sigma=3.0)  # fresh sensor noise in every frame


def make_moving_shapes(out: Path, split: str = "all", seed: int = 0, size: str = "default") -> Path:
    """moving-shapes: 8-class clips of one coloured shape (plus, in 60% of clips, a static distractor)
    on a textured background, 17-20 frames of 72 x 96 px, laid out like Something-Something v1 as
    RSA reads it::

        DIR/something-something-v1-labels.csv           class names, one a line, line i = label i
        DIR/something_{train,val}_cluster.txt           "<video_dir> <num_frames> <label>" a line
        DIR/20bn-something-something-v1/<id>/img_00001.jpg ...   frames, 1-based

    ``<video_dir>`` is relative to DIR (``20bn-something-something-v1/<id>``); train ids start at 1,
    val ids at 100001. Classes (label order): moving left, moving right, growing, shrinking, rotating
    clockwise, rotating counter-clockwise, appearing, disappearing: each pair is the time reversal
    of the other (a clip played backwards is a valid clip of its partner class), so a model that
    ignores frame order is at chance within each pair. Every clip has more than 16 frames, so the
    original's sampling of T <= 16 segments never falls back to repeating the first frame. Default 120 train / 30 val clips per class (1200 clips), tiny 1 / 1.

    Chance: top-1 12.5%, top-5 62.5% (8 balanced classes); a frame-order-blind model caps at 50% top-1.
    """
    out = Path(out)

    def owned(s: str) -> list[Path]:  # the split's list and the frame folders in its id range
        folders = out / _VIDEO_FOLDER
        mine = [p for p in folders.iterdir() if p.name.isdigit() and _video_split(int(p.name)) == s] \
            if folders.is_dir() else []
        return [out / _VIDEO_LISTS[s]] + mine

    info = _prepare(out, "moving-shapes", split, seed, size, owned)
    (out / "something-something-v1-labels.csv").write_text("".join(c + "\n" for c in VIDEO_CLASSES), encoding="utf-8")
    for s in _splits(split):
        per_class = getattr(_VIDEO_SIZES, size)[s]
        order = _rng(seed, "moving-shapes", s, "order").permutation(per_class * len(VIDEO_CLASSES))
        lines, total_frames = [], 0
        for index, slot in enumerate(order):
            label = int(slot) % len(VIDEO_CLASSES)
            rng = _rng(seed, "moving-shapes", s, index)
            num_frames = int(rng.integers(17, 21))
            video_dir = f"{_VIDEO_FOLDER}/{_VIDEO_FIRST_ID[s] + index}"
            folder = out / video_dir
            folder.mkdir(parents=True)
            for f, frame in enumerate(_render_clip(rng, label, num_frames)):
                _save_jpeg(Image.fromarray(frame), folder / f"img_{f + 1:05d}.jpg")
            lines.append(f"{video_dir} {num_frames} {label}")
            total_frames += num_frames
        (out / _VIDEO_LISTS[s]).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        k = len(VIDEO_CLASSES)
        _finish(out, info, s, seed, size, {"videos": len(lines), "frames": total_frames, "classes": k},
                {"top1": 100 / k, "top5": 100 * min(5, k) / k} if s == "val" else None)
    return out


# =============================================================================================
# shapes-cls (ImageNet class folders)


#: Class names in label order; the folder of class i is ``CLS_WNIDS[i]`` (sorted = label order).
CLS_CLASSES = ["circle", "ring", "triangle", "square", "pentagon", "hexagon", "star", "cross", "crescent", "arrow"]
CLS_WNIDS = [f"n9{i:07d}" for i in range(len(CLS_CLASSES))]
_CLS_SIZES = _Sizes(default={"train": 260, "val": 50}, tiny={"train": 3, "val": 2})  # images per class


def _render_cls(rng: np.random.Generator, label: int) -> Image.Image:
    width, height = int(rng.integers(64, 97)), int(rng.integers(64, 97))
    side = min(width, height)
    back_a = _hsv(rng, s=(0.0, 0.8), v=(0.2, 1.0))
    back_b = tuple(int(np.clip(c + rng.integers(-60, 61), 0, 255)) for c in back_a)
    image = _texture(rng, width, height, back_a, back_b)
    fill_a = _contrasting(rng, _luma(back_a), min_diff=70)
    fill_b = tuple(int(np.clip(c + rng.integers(-70, 71), 0, 255)) for c in fill_a)
    # inside the centre crop (87.5%) of the evaluation transform
    r = _uniform(rng, 0.22, 0.36) * side
    cx = width / 2 + _uniform(rng, -0.12, 0.12) * side
    cy = height / 2 + _uniform(rng, -0.12, 0.12) * side
    mask = _shape_mask(CLS_CLASSES[label], (width, height), cx, cy, r, _uniform(rng, 0, 2 * math.pi))
    image.paste(_texture(rng, width, height, fill_a, fill_b), mask=mask)
    return Image.fromarray(_with_noise(rng, np.asarray(image), sigma=_uniform(rng, 2, 8)))


def make_shapes_cls(out: Path, split: str = "all", seed: int = 0, size: str = "default") -> Path:
    """shapes-cls: 10 shape classes (circle, ring, triangle, square, pentagon, hexagon, star, cross,
    crescent, arrow) at random rotation, size and colour, filled with a random texture (solid,
    stripes, checker, dots) on another random texture; images 64-96 px a side, ImageNet layout::

        DIR/LOC_synset_mapping.txt                       "<wnid> <name>" a line, label order
        DIR/train/<wnid>/<wnid>_<n>.JPEG                 wnids n90000000 ... n90000009
        DIR/val/<wnid>/ILSVRC2012_val_<n:08d>.JPEG

    Textures and colours are independent of the class: only the outline tells it. Default 260
    train / 50 val images per class (3100 images), tiny 3 / 2.

    Chance: top-1 10%, top-5 50%.
    """
    out = Path(out)
    info = _prepare(out, "shapes-cls", split, seed, size, lambda s: [out / s])
    (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(CLS_WNIDS, CLS_CLASSES)),
                                                encoding="utf-8")
    k = len(CLS_CLASSES)
    for s in _splits(split):
        per_class = getattr(_CLS_SIZES, size)[s]
        for wnid in CLS_WNIDS:
            (out / s / wnid).mkdir(parents=True)
        # ImageNet's validation images are numbered in one run across shuffled classes
        labels = _rng(seed, "shapes-cls", s, "order").permutation(per_class * k) % k
        seen = [0] * k
        for index, label in enumerate(labels.tolist()):
            image = _render_cls(_rng(seed, "shapes-cls", s, index), label)
            wnid = CLS_WNIDS[label]
            seen[label] += 1
            name = f"{wnid}_{seen[label]}.JPEG" if s == "train" else f"ILSVRC2012_val_{index + 1:08d}.JPEG"
            _save_jpeg(image, out / s / wnid / name)
        _finish(out, info, s, seed, size, {"images": len(labels), "classes": k},
                {"top1": 100 / k, "top5": 100 * min(5, k) / k} if s == "val" else None)
    return out


# =============================================================================================
# Registry and entry points


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
        raise ValueError(f"unknown synthetic dataset kind {kind!r}; known: {', '.join(sorted(DATASETS))}")
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
