"""shapes-det and raised-hands: COCO 2017 detection datasets (:func:`make_shapes_det`, :func:`make_raised_hands`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zoo.data.synthetic.draw import (_HAIR, _SKIN, _contrasting, _gradient, _hsv, _luma, _mask_box, _shape_mask,
                                     _uniform, _with_noise)
from zoo.data.synthetic.layout import _make_coco_dataset, _Sizes


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
