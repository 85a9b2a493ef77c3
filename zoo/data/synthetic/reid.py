"""shapes-reid: synthetic pedestrians laid out like Market-1501 (:func:`make_shapes_reid`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from zoo.data.synthetic.draw import _HAIR, _SKIN, _hsv, _rng, _save_jpeg, _uniform, _with_noise
from zoo.data.synthetic.layout import _finish, _prepare, _Sizes, _splits
from zoo.paths import progress_bar


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
        for index, shot in enumerate(progress_bar(shots[s], desc=f"shapes-reid {s}", unit="image")):
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
