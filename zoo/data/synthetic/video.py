"""moving-shapes: 8 temporal-order classes laid out like Something-Something v1 (:func:`make_moving_shapes`)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from zoo.data.synthetic.draw import _contrasting, _gradient, _luma, _rng, _save_jpeg, _shape_mask, _uniform, _with_noise
from zoo.data.synthetic.layout import _finish, _prepare, _Sizes, _splits
from zoo.paths import progress_bar


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
        for index, slot in enumerate(progress_bar(order, desc=f"moving-shapes {s}", unit="clip")):
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
