"""Something-Something v1/v2 evaluation, the ``ssv`` protocol of ``python -m zoo eval``
(spec ``shared/specs/rsa.md`` §4).

As the RSA original's test scripts run it: the validation split list, 16 frames per video by
TSN segment sampling, 1 clip x 1 centre crop 224 of frames resized to 240 x 320, the model's
logits, top-1 / top-5 accuracy in percent over every listed video. Reading and preprocessing
are in :mod:`zoo.data.ssv`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from zoo.data.ssv import SPLIT_FILES, SSVideoClips, read_split
from zoo.errors import ConfigError, DatasetError, InputError
from zoo.eval.metrics import per_class_top1, topk_accuracy
from zoo.eval.protocol import Protocol, register_protocol

__all__ = ["SSVProtocol"]


@register_protocol("ssv")
class SSVProtocol(Protocol):
    """Top-1 / top-5 on a Something-Something split.

    Options (config ``eval`` mapping or ``--options``):
        dataset: ``ssv1`` (default) or ``ssv2``: which split file to read and which reported rows apply.
        split: ``val`` (default; the original tests on the validation list) or ``train``.
        list_file: a split file overriding the default name (relative to the data dir or absolute).
        num_frames: frames per clip (default: the config's ``num_frames``, 16).
        clips: evenly shifted clips per video whose logits are averaged (default 1, the original's).
        resize: ``[height, width]`` every frame is resized to (default [240, 320]).
        crop: centre crop size (default 224).
        prefix: frame file prefix (default ``img_``: ``img_00001.jpg``).
    Samples: ``(clips, 3T, crop, crop)`` tensors; the model gets ``(B * clips, 3T, crop, crop)``.
    """

    task = "video classification"

    _KNOWN = {"dataset", "split", "list_file", "num_frames", "clips", "resize", "crop", "prefix"}

    def __init__(self, data_dir: Path, model_config, options: dict, limit: Optional[int] = None):
        super().__init__(data_dir, model_config, options, limit)
        unknown = sorted(set(self.options) - self._KNOWN)
        if unknown:
            raise ConfigError(f"unknown ssv protocol option(s) {unknown}; known: {sorted(self._KNOWN)}")
        self.dataset_name = self.options.get("dataset", "ssv1")
        if self.dataset_name not in SPLIT_FILES:
            raise ConfigError(f"ssv protocol: unknown dataset {self.dataset_name!r}; known: {', '.join(SPLIT_FILES)}")
        self.split = self.options.get("split", "val")
        if self.split not in SPLIT_FILES[self.dataset_name]:
            raise ConfigError(f"ssv protocol: split must be 'val' or 'train', got {self.split!r}")
        list_file = Path(self.options.get("list_file") or SPLIT_FILES[self.dataset_name][self.split])
        self.list_file = list_file if list_file.is_absolute() else self.data_dir / list_file
        # the options num_frames, resize and crop override the model's preprocessing
        fields = {"num_frames": "num_frames", "resize": "resize", "crop": "input_size"}
        overrides = {field: self.options[option] for option, field in fields.items() if self.options.get(option)}
        self.transform = self.eval_transform(**overrides)
        self.num_frames = self.transform.num_frames
        self.clips = int(self.options.get("clips", 1))
        self.prefix = str(self.options.get("prefix", "img_"))
        self._dataset: Optional[SSVideoClips] = None

    def dataset(self) -> SSVideoClips:
        if self._dataset is None:
            if not self.data_dir.is_dir():
                raise DatasetError(f"expected the Something-Something folder {self.data_dir} holding "
                                   f"{self.list_file.name} and the frame folders; it does not exist")
            records = read_split(self.list_file, self.data_dir)
            if self.limit is not None:
                records = records[: self.limit]
            self._dataset = SSVideoClips(records, num_segments=self.num_frames, clips=self.clips,
                                         transform=self.transform, prefix=self.prefix)
        return self._dataset

    def collate(self, items: list):
        clips = torch.stack([clip for clip, _ in items])  # (B, clips, 3T, crop, crop)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return clips, labels

    def predict(self, model, batch, device) -> list:
        clips, labels = batch
        b, n = clips.shape[:2]
        logits = model(clips.flatten(0, 1).to(device))
        if logits.dim() != 2 or logits.shape[0] != b * n:
            raise InputError(f"ssv protocol: expected logits ({b * n}, num_classes), got {tuple(logits.shape)}")
        logits = logits.float().cpu().view(b, n, -1).mean(dim=1)  # average the clips' logits
        # clone: a row view would pickle the whole batch's storage when gathered across processes
        return [(row.clone(), int(label)) for row, label in zip(logits, labels)]

    def compute(self, predictions: list) -> dict[str, float]:
        logits = torch.stack([p for p, _ in predictions])
        labels = torch.tensor([label for _, label in predictions], dtype=torch.long)
        guesses = torch.argsort(logits, dim=1, descending=True, stable=True)[:, 0]  # topk_accuracy's order for ties
        self.per_class_metrics = per_class_top1(guesses.tolist(), labels.tolist())
        return topk_accuracy(logits, labels, ks=(1, 5))
