"""``imagenet`` protocol: top-1 / top-5 classification accuracy on class folders.

Dataset (``--data DIR``): ImageNet-style class folders (:mod:`zoo.data.imagefolder`), either
``DIR/<class>/*`` or ``DIR/<split>/<class>/*`` with ``split`` from the options (default ``val``,
ImageNet's validation set arranged by class, the layout torchvision and timm use).

Preprocessing comes from the model config's ``preprocessing`` (:meth:`Protocol.eval_transform`,
the single centre crop): ``input_size`` [H, W], ``crop_pct`` (resize the shorter side to H / crop_pct,
then centre crop; default 0.875), ``mean``, ``std``, ``interpolation``.

Options (config ``eval`` mapping): ``dataset`` (name matched against the reported rows, default
``imagenet_val``), ``split`` (default ``val``), ``num_classes`` (expected number of class folders;
a mismatch is an error since labels would be shifted).

Metrics in percent: ``top1``, ``top5`` (:func:`zoo.eval.metrics.topk_accuracy`); per class: ``top1``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from zoo.data.imagefolder import ImageFolder, find_classes
from zoo.errors import ConfigError, DatasetError, InputError
from zoo.eval.metrics import per_class_top1, topk_accuracy
from zoo.eval.protocol import Protocol, register_protocol

_KS = (1, 5)


@register_protocol("imagenet")
class ImageNetProtocol(Protocol):
    """Single centre crop, logits -> top-k accuracy; predictions are each sample's top-5 (ids, scores) + label."""

    def __init__(self, data_dir: Path, model_config, options: dict, limit: Optional[int] = None):
        super().__init__(data_dir, model_config, options, limit)
        known = {"dataset", "split", "num_classes"}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ConfigError(f"imagenet protocol: unknown option(s) {unknown}; known: {sorted(known)}")
        self.dataset_name = self.options.get("dataset", "imagenet_val")
        self.split = str(self.options.get("split", "val"))
        self.root = self._resolve_root(Path(data_dir), self.split)
        self.transform = self.eval_transform()

    @staticmethod
    def _resolve_root(data_dir: Path, split: str) -> Path:
        """DIR/<split> when it exists, else DIR itself (which must hold the class folders)."""
        if not data_dir.is_dir():
            raise DatasetError(f"expected the dataset folder {data_dir} holding class folders "
                               f"(DIR/<class>/*.JPEG or DIR/{split}/<class>/*.JPEG); it does not exist")
        candidate = data_dir / split
        return candidate if candidate.is_dir() else data_dir

    def dataset(self) -> ImageFolder:
        expected = self.options.get("num_classes")
        if expected is not None:
            found = len(find_classes(self.root))
            if found != int(expected):
                raise DatasetError(f"expected {expected} class folders in {self.root} for dataset "
                                   f"'{self.dataset_name}', found {found}: labels would not match the model's classes")
        return ImageFolder(self.root, transform=self.transform, limit=self.limit)

    def collate(self, items: list):
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return images, labels

    def predict(self, model, batch, device) -> list:
        images, labels = batch
        logits = model(images.to(device)).float().cpu()
        if logits.dim() != 2:
            raise InputError(f"imagenet protocol expects (B, num_classes) logits, got {tuple(logits.shape)}")
        # keep only what top-5 needs: ranks from a stable sort (the same order topk_accuracy uses)
        k = min(max(_KS), logits.shape[1])
        order = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :k]
        scores = logits.gather(1, order)
        return [(order[i].tolist(), scores[i].tolist(), int(labels[i])) for i in range(len(labels))]

    def compute(self, predictions: list) -> dict[str, float]:
        """Top-k over the kept top-5: the label's position among them is the label of a (N, 5) problem."""
        if not predictions:
            raise DatasetError(f"no samples were evaluated in {self.root}")
        scores = torch.tensor([p[1] for p in predictions], dtype=torch.float64)
        positions = torch.tensor([p[0].index(p[2]) if p[2] in p[0] else -1 for p in predictions])
        self.per_class_metrics = per_class_top1([p[0][0] for p in predictions], [p[2] for p in predictions])
        return topk_accuracy(scores, positions, ks=_KS)

    def class_names(self) -> dict[int, str]:
        return dict(enumerate(find_classes(self.root)))
