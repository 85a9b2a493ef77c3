"""Something-Something v1/v2 as the RSA original reads them (spec ``shared/specs/rsa.md`` §4).

On-disk layout (frames extracted beforehand, as the original expects)::

    ROOT/something_val_cluster.txt          # SSv1 split (SSv2: something_v2_val_cluster.txt)
    ROOT/<video_dir>/img_00001.jpg          # 1-based frame files, RGB JPEG
    ROOT/<video_dir>/img_00002.jpg
    ...

Each split line is ``<video_dir> <num_frames> <label>`` separated by single spaces, label a
0-based int. The original uses ``<video_dir>`` as-is (its root path is empty); here a relative
``<video_dir>`` is taken relative to ROOT, an absolute one as-is.

Evaluation sampling and preprocessing (the original's validation pipeline):

* T segment frames: if num_frames > T, tick = num_frames / T and frame i is
  ``floor(tick / 2 + tick * i) + 1``; otherwise frame 1 is repeated T times.
* every frame resized to exactly 240 x 320 (H x W, aspect ratio not kept, PIL bilinear), centre
  crop 224 (top 8, left 48), scaled to [0, 1], normalised with the ImageNet mean / std
  (:class:`zoo.data.transforms.VideoEvalTransform`, which takes other sizes from the model's preprocessing);
* frames stacked along channels: a clip is (3T, 224, 224) with channel ``3 t + c``.

``clips > 1`` (not used by the original, which tests 1 clip) takes ``clips`` evenly shifted
segment samplings: clip c uses the offset ``tick * (c + 0.5) / clips`` instead of ``tick / 2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from zoo.data.transforms import DEFAULT_NUM_FRAMES, VideoEvalTransform
from zoo.errors import DatasetError

__all__ = ["SPLIT_FILES", "VideoRecord", "read_split", "segment_indices", "SSVideoClips", "load_frame"]

# Split lists named in the original's logs (spec §4).
SPLIT_FILES = {
    "ssv1": {"val": "something_val_cluster.txt", "train": "something_train_cluster.txt"},
    "ssv2": {"val": "something_v2_val_cluster.txt", "train": "something_v2_train_cluster.txt"},
}
_LINE_FORMAT = "one video per line: '<video_dir> <num_frames> <label>' (single spaces, 0-based label)"


@dataclass(frozen=True)
class VideoRecord:
    """One line of a split file: frame folder, number of frames, 0-based label."""

    path: Path
    num_frames: int
    label: int


def read_split(list_file: Path, root: Optional[Path] = None) -> list[VideoRecord]:
    """Parse a split file; ``root`` (default: the list file's folder) anchors relative video dirs."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    if not list_file.is_file():
        raise DatasetError(f"expected the split file {list_file} ({_LINE_FORMAT}); it does not exist")
    records = []
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(" ")
        try:
            if len(parts) != 3:
                raise ValueError(f"{len(parts)} fields")
            video, num_frames, label = parts[0], int(parts[1]), int(parts[2])
            if num_frames < 1 or label < 0:
                raise ValueError("num_frames must be >= 1 and label >= 0")
        except ValueError as exc:
            raise DatasetError(f"{list_file}:{number}: malformed line {line!r} ({exc}); expected {_LINE_FORMAT}") from None
        path = Path(video)
        records.append(VideoRecord(path if path.is_absolute() else root / path, num_frames, label))
    if not records:
        raise DatasetError(f"{list_file} lists no videos; expected {_LINE_FORMAT}")
    return records


def segment_indices(num_frames: int, num_segments: int, clip: int = 0, clips: int = 1) -> list[int]:
    """1-based frame numbers of one evaluation clip (the original's ``_get_val_indices`` for clip 0 of 1)."""
    if num_frames > num_segments:
        tick = num_frames / num_segments
        offset = tick * (clip + 0.5) / clips  # tick / 2 for the single clip of the original
        return [int(offset + tick * i) + 1 for i in range(num_segments)]
    return [1] * num_segments


def load_frame(path: Path):
    """An RGB ``PIL.Image``; DatasetError naming the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetError(f"expected frame file {path} (frame folders hold img_00001.jpg, img_00002.jpg, ...)")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read frame {path}: {exc}") from exc


class SSVideoClips(torch.utils.data.Dataset):
    """Evaluation clips of a split: item ``i`` is ``(clips_tensor, label)``.

    ``clips_tensor`` is (clips, 3T, crop, crop) float32, frames stacked along channels
    (channel ``3 t + c``), made by ``transform`` (default: the original's validation frames).
    Items are picklable, so DataLoader workers can build them.
    """

    def __init__(self, records: Sequence[VideoRecord], num_segments: int = DEFAULT_NUM_FRAMES, clips: int = 1,
                 transform: Optional[VideoEvalTransform] = None, prefix: str = "img_", template: str = "{:05d}.jpg"):
        if num_segments < 1 or clips < 1:
            raise ValueError(f"num_segments and clips must be >= 1, got {num_segments}, {clips}")
        self.records = list(records)
        self.num_segments, self.clips = num_segments, clips
        self.transform = transform or VideoEvalTransform()
        self.prefix, self.template = prefix, template

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        cache: dict[int, torch.Tensor] = {}  # frame number -> (3, crop, crop) uint8; clips may share frames
        clips = []
        for c in range(self.clips):
            frames = []
            for index in segment_indices(record.num_frames, self.num_segments, c, self.clips):
                if index not in cache:
                    path = record.path / f"{self.prefix}{self.template.format(index)}"
                    cache[index] = self.transform.frame(load_frame(path))
                frames.append(cache[index])
            clips.append(self.transform.clip(frames))
        return torch.stack(clips), record.label
