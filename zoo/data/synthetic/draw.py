"""Seeding, colours and drawing helpers of the synthetic datasets.

Every sample draws from its own generator (:func:`_rng`, seeded by ``(seed, kind, split, index)``), and
images are written with fixed encoder settings, so the same arguments always give the same bytes.
"""
from __future__ import annotations

import colorsys
import json
import math
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

# Fixed encoder settings: the same pixels always give the same file bytes.
_JPEG = dict(format="JPEG", quality=90, subsampling=2, optimize=False, progressive=False)

# Skin and hair colours of the people in raised-hands and shapes-reid.
_SKIN = [(241, 194, 160), (224, 172, 130), (198, 134, 90), (141, 85, 56), (92, 58, 40)]
_HAIR = [(30, 25, 20), (70, 45, 25), (140, 100, 50), (200, 170, 110), (120, 120, 120)]


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
