"""shapes-cls: 10 shape classes in ImageNet class folders (:func:`make_shapes_cls`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from zoo.data.synthetic.draw import (_contrasting, _hsv, _luma, _rng, _save_jpeg, _shape_mask, _texture, _uniform,
                                     _with_noise)
from zoo.data.synthetic.layout import _finish, _prepare, _Sizes, _splits
from zoo.paths import progress_bar


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
        for index, label in enumerate(progress_bar(labels.tolist(), desc=f"shapes-cls {s}", unit="image")):
            image = _render_cls(_rng(seed, "shapes-cls", s, index), label)
            wnid = CLS_WNIDS[label]
            seen[label] += 1
            name = f"{wnid}_{seen[label]}.JPEG" if s == "train" else f"ILSVRC2012_val_{index + 1:08d}.JPEG"
            _save_jpeg(image, out / s / wnid / name)
        _finish(out, info, s, seed, size, {"images": len(labels), "classes": k},
                {"top1": 100 / k, "top5": 100 * min(5, k) / k} if s == "val" else None)
    return out
