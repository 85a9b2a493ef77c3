"""``python -m zoo train NAME --data DIR --out DIR``: train a registered model on a dataset in its
original on-disk format, seeded and deterministic on CPU, and write a converted-format folder.

The family is picked by the model config's ``eval.protocol`` (the dataset format the model is
evaluated on is the one it trains on):

=========  ======================================  ===============================================
protocol   training data (train split)             loss
=========  ======================================  ===============================================
coco       ``DIR/annotations/instances_train2017``  DETR-style outputs: Hungarian-matched set loss
           ``.json`` + ``DIR/train2017/``           (:class:`zoo.losses.SetCriterion`, CE with eos
                                                    0.1 + 5 L1 + 2 GIoU); a torchvision detector:
                                                    its own loss dict (``model(images, targets)``)
reid       Market-1501 ``DIR/bounding_box_train/``  label-smoothing CE on the logits + batch-hard
           (PK batches: P identities x K images)    triplet (margin 0.3) on ``feat_`` (spec rga §2.2)
imagenet   class folders ``DIR/train/<class>/``     cross-entropy
ssv        Something-Something lists + frames       cross-entropy
           (``something[_v2]_train_cluster.txt``)
=========  ======================================  ===============================================

Everything random is drawn from generators seeded by ``(seed, epoch, ...)``: the model's
initialisation (``torch.manual_seed(seed)``), the sample order, each sample's augmentation, and
the dropout masks (the global generator, seeded once; data loading runs in the main thread so
nothing else draws from it). ``torch.use_deterministic_algorithms(True, warn_only=True)`` is on
while training, so two runs with the same arguments give the same weights on CPU.

The result is the folder ``zoo.convert.write_model_folder`` writes (``model.safetensors``,
``config.json`` with the constructor kwargs and the training record, ``README.md``), so
``zoo.create_model(NAME, weights=OUT)`` loads it.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import DatasetError

__all__ = ["train", "build_task", "TrainTask", "DetrTask", "TorchvisionDetectionTask", "ReidTask",
           "ClassificationTask", "VideoTask", "add_cli"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Constructor kwargs that fetch something on construction: a trained folder must not record them,
# or loading it would download ImageNet weights only to overwrite them.
_DOWNLOADING_KWARGS = ("pretrained_backbone",)


# =============================================================================================
# Seeding


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer ``keys`` (numpy's SeedSequence mixes them well)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def _batches_in_order(n: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """A seeded permutation of range(n) cut into batches; an incomplete last batch is dropped unless it is the
    only one (a batch of one would break BatchNorm statistics and the set losses gain nothing from it)."""
    order = torch.randperm(n, generator=gen).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


# =============================================================================================
# Image helpers (PIL in, normalised tensor out)


def _to_tensor(image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """PIL RGB -> (3, H, W) float, scaled to [0, 1] then normalised per channel."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _random_crop(image, height: int, width: int, gen: torch.Generator):
    """A random ``height`` x ``width`` crop of a PIL image at least that large."""
    left = _randint(gen, 0, image.width - width)
    top = _randint(gen, 0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def _size_pair(value, name: str) -> tuple[int, int]:
    """An int or [h, w] -> (h, w)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"preprocessing {name} must be an int or [height, width], got {value!r}")


# =============================================================================================
# Tasks: the data and the loss of one family


class TrainTask:
    """Training data and loss of one family.

    Subclasses read the train split in ``__init__`` and implement ``__len__``, :meth:`sample`
    (one augmented sample), :meth:`collate` (samples -> one batch) and :meth:`loss`.
    ``batches(epoch)`` yields the epoch's batches in a seeded order; the same (seed, epoch)
    always gives the same batches, augmentation included.
    """

    protocol = ""

    def __init__(self, data_dir: Path, *, batch_size: int, seed: int = 0, limit: Optional[int] = None,
                 preprocessing: Optional[dict] = None, options: Optional[dict] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.limit = limit
        self.preprocessing = dict(preprocessing or {})
        self.options = dict(options or {})

    # -- to implement -------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, index: int, gen: torch.Generator):
        """Sample ``index`` with its augmentation drawn from ``gen``."""
        raise NotImplementedError

    def collate(self, samples: list):
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, device: Union[str, torch.device]) -> Tensor:
        """The scalar training loss of ``model`` (in train mode) on ``batch``."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """The sample indices of each batch of ``epoch``."""
        if len(self) == 0:
            raise DatasetError(f"no training samples in {self.data_dir}")
        return _batches_in_order(len(self), self.batch_size, _generator(self.seed, epoch, 0))

    def batches(self, epoch: int) -> Iterator:
        for step, indices in enumerate(self.epoch_indices(epoch)):
            yield self.collate([self.sample(i, _generator(self.seed, epoch, 1, step, slot))
                                for slot, i in enumerate(indices)])

    def describe(self) -> dict:
        """What the training record says about the data."""
        return {"format": self.protocol, "samples": len(self)}


# ---------------------------------------------------------------------------------------------
# Detection (COCO format)


def _coco_train_split(options: dict) -> str:
    """The train split beside the evaluated one: 'val2017' -> 'train2017'."""
    split = str(options.get("split", "val2017"))
    return split.replace("val", "train") if "val" in split else "train2017"


class _CocoTrainData(TrainTask):
    """COCO-format images and their boxes (crowd boxes and empty boxes skipped), as (PIL, boxes xyxy px, labels)."""

    protocol = "coco"

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        from zoo.data.coco import CocoDetection

        self.split = _coco_train_split(self.options)
        self.coco = CocoDetection(self.data_dir, self.split, limit=self.limit)

    def __len__(self) -> int:
        return len(self.coco)

    def load(self, index: int):
        """-> (PIL RGB image, boxes (n, 4) xyxy pixels float32, labels (n,) int64 COCO category ids)."""
        image, meta = self.coco.load_image(index)
        boxes, labels = [], []
        for ann in self.coco.coco.imgToAnns.get(meta["image_id"], []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, image.width), min(y + h, image.height)
            if x1 > x0 and y1 > y0:
                boxes.append([x0, y0, x1, y1])
                labels.append(int(ann["category_id"]))
        return (image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64))

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split}


def _hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Mirror xyxy boxes horizontally inside an image ``width`` wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class DetrTask(_CocoTrainData):
    """DETR training on COCO-format data (spec irpe §5.2).

    Sample: DETR's resize (shorter side ``resize_shorter``, longer side <= ``max_size``, from the
    model config's preprocessing), a random horizontal flip (p 0.5), ImageNet normalisation.
    Targets: ``labels`` = COCO category ids (DETR predicts them directly), ``boxes`` normalised
    cxcywh. Loss: :class:`zoo.losses.SetCriterion` (Hungarian costs 1/5/2; CE with eos 0.1 +
    5 L1 + 2 GIoU, on the final and every auxiliary decoder output).
    """

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.resize_shorter = int(self.preprocessing.get("resize_shorter", 800))
        self.max_size = self.preprocessing.get("max_size", 1333)
        self.mean = tuple(self.preprocessing.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.preprocessing.get("std", IMAGENET_STD))
        self.flip = bool(self.options.get("hflip", True))
        self._criterion = None

    def sample(self, index: int, gen: torch.Generator):
        from PIL import Image

        from zoo.data.coco import detr_resize_size
        from zoo.losses import box_xyxy_to_cxcywh

        image, boxes, labels = self.load(index)
        width, height = image.width, image.height
        if self.flip and _uniform(gen) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = _hflip_boxes(boxes, width)
        new_h, new_w = detr_resize_size(width, height, self.resize_shorter, self.max_size)
        if (new_h, new_w) != (height, width):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        # normalised by the original size: the resize scales boxes and image alike
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {"labels": labels, "boxes": box_xyxy_to_cxcywh(boxes / scale)}
        return _to_tensor(image, self.mean, self.std), target

    def collate(self, samples: list):
        return [image for image, _ in samples], [target for _, target in samples]

    def loss(self, model: nn.Module, batch, device) -> Tensor:
        from zoo.losses import SetCriterion

        images, targets = batch
        outputs = model([image.to(device) for image in images])
        if not isinstance(outputs, dict) or "pred_logits" not in outputs or "pred_boxes" not in outputs:
            raise TypeError("the coco training task expects DETR-style outputs (a dict with 'pred_logits' and "
                            f"'pred_boxes'), got {type(outputs).__name__}")
        num_classes = outputs["pred_logits"].shape[-1] - 1
        if self._criterion is None or self._criterion.num_classes != num_classes:
            self._criterion = SetCriterion(num_classes, aux_loss=True).to(device)
        for target in targets:
            if target["labels"].numel() and int(target["labels"].max()) >= num_classes:
                raise DatasetError(f"{self.coco.ann_file} has category id {int(target['labels'].max())} but the model "
                                   f"predicts ids 0..{num_classes - 1}; build it with num_classes > the largest id")
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        return self._criterion(outputs, targets)["loss"]


class TorchvisionDetectionTask(_CocoTrainData):
    """Training of a torchvision detector (Faster R-CNN: the hand-raising model) on COCO-format data.

    Sample: the image in [0, 1] at its own size (the detector resizes and normalises it itself), a
    random horizontal flip (p 0.5). Targets: ``boxes`` xyxy pixels, ``labels`` = category ids
    (0 is the detector's background). Loss: the sum of the loss dict ``model(images, targets)``
    returns in train mode (RPN objectness + box regression, ROI classification + box regression).
    """

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.flip = bool(self.options.get("hflip", True))

    def sample(self, index: int, gen: torch.Generator):
        from PIL import Image

        image, boxes, labels = self.load(index)
        if self.flip and _uniform(gen) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = _hflip_boxes(boxes, image.width)
        return _to_tensor(image, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), {"boxes": boxes, "labels": labels}

    def collate(self, samples: list):
        return [image for image, _ in samples], [target for _, target in samples]

    def loss(self, model: nn.Module, batch, device) -> Tensor:
        images, targets = batch
        num_classes = getattr(getattr(getattr(model, "roi_heads", None), "box_predictor", None), "cls_score", None)
        if num_classes is not None:
            for target in targets:
                if target["labels"].numel() and int(target["labels"].max()) >= num_classes.out_features:
                    raise DatasetError(f"{self.coco.ann_file} has category id {int(target['labels'].max())} but the "
                                       f"detector has {num_classes.out_features} classes (background included)")
        losses = model([image.to(device) for image in images],
                       [{k: v.to(device) for k, v in t.items()} for t in targets])
        if not isinstance(losses, dict) or not losses:
            raise TypeError("a torchvision detector in train mode must return its loss dict")
        return sum(losses.values())


# ---------------------------------------------------------------------------------------------
# Re-id (Market-1501 layout)


class ReidTask(TrainTask):
    """Re-id training as the RGA original (spec rga §2.2, §5.2), on a Market-1501 layout.

    Batches: P x K sampling - each epoch visits every identity once in a seeded random order and
    takes K (``num_instances``, default 4) of its images (without replacement, with it when it has
    fewer); P = batch_size / K identities a batch, incomplete batches dropped.
    Sample: with p 0.5 resize to 1.125 x the input size and take a random crop, else plain resize
    (Random2DTranslation), random horizontal flip, ImageNet normalisation. (The original's random
    erasing is left out.)
    Loss: :class:`zoo.losses.CrossEntropyLabelSmooth` (eps 0.1) on the logits + :class:`zoo.losses.TripletLoss`
    (margin 0.3) on ``feat_``; the model in train mode returns ``(feat_, feat, logits)``.
    Labels are the training pids in sorted order mapped to 0..N-1; the model needs >= N classes.
    """

    protocol = "reid"

    def __init__(self, data_dir: Path, *, num_instances: int = 4, **kwargs):
        super().__init__(data_dir, **kwargs)
        if not isinstance(num_instances, int) or num_instances < 1:
            raise ValueError(f"num_instances (K) must be a positive int, got {num_instances!r}")
        if self.batch_size % num_instances:
            raise ValueError(f"re-id batch_size ({self.batch_size}) must be a multiple of num_instances K "
                             f"({num_instances}): a batch is P identities x K images")
        self.num_instances = num_instances
        self.num_identities_per_batch = self.batch_size // num_instances
        if self.num_identities_per_batch < 2:
            raise ValueError(f"re-id batches need P >= 2 identities for the triplet loss; batch_size "
                             f"{self.batch_size} / K {num_instances} = {self.num_identities_per_batch}")
        from zoo.data.reid import read_market1501_train

        images = read_market1501_train(self.data_dir)
        self.images = images[:self.limit] if self.limit is not None else images
        pids = sorted({im.pid for im in self.images})
        self.label_of = {pid: label for label, pid in enumerate(pids)}
        self.by_label: list[list[int]] = [[] for _ in pids]
        for index, im in enumerate(self.images):
            self.by_label[self.label_of[im.pid]].append(index)
        if len(pids) < self.num_identities_per_batch:
            raise DatasetError(f"{self.data_dir}: {len(pids)} training identities, fewer than P = "
                               f"{self.num_identities_per_batch} identities a batch")
        self.height, self.width = _size_pair(self.preprocessing.get("input_size", (256, 128)), "input_size")
        self.mean = tuple(self.preprocessing.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.preprocessing.get("std", IMAGENET_STD))
        self._ce = None

    @property
    def num_identities(self) -> int:
        return len(self.by_label)

    def __len__(self) -> int:
        return len(self.images)

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        gen = _generator(self.seed, epoch, 0)
        identities = torch.randperm(self.num_identities, generator=gen).tolist()
        k, p = self.num_instances, self.num_identities_per_batch
        picks = []
        for label in identities:
            pool = self.by_label[label]
            if len(pool) >= k:
                chosen = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:k].tolist()]
            else:
                chosen = [pool[i] for i in torch.randint(len(pool), (k,), generator=gen).tolist()]
            picks.append(chosen)
        return [sum(picks[i:i + p], []) for i in range(0, len(picks) - p + 1, p)]

    def sample(self, index: int, gen: torch.Generator):
        from PIL import Image

        from zoo.data.imagefolder import load_rgb

        im = self.images[index]
        image = load_rgb(im.path)
        if _uniform(gen) < 0.5:  # Random2DTranslation
            big = image.resize((round(self.width * 1.125), round(self.height * 1.125)), Image.BILINEAR)
            image = _random_crop(big, self.height, self.width, gen)
        elif image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), Image.BILINEAR)
        if _uniform(gen) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.mean, self.std), self.label_of[im.pid]

    def collate(self, samples: list):
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)

    def loss(self, model: nn.Module, batch, device) -> Tensor:
        from zoo.losses import CrossEntropyLabelSmooth, TripletLoss

        images, labels = batch
        outputs = model(images.to(device))
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            raise TypeError("re-id training expects the model in train mode to return (feat_, feat, logits)")
        feat_, _, logits = outputs
        num_classes = logits.shape[1]
        if num_classes < self.num_identities:
            raise DatasetError(f"{self.data_dir} has {self.num_identities} training identities but the model has "
                               f"{num_classes} classes; build it with num_classes={self.num_identities}")
        if self._ce is None or self._ce.num_classes != num_classes:
            self._ce = CrossEntropyLabelSmooth(num_classes, epsilon=0.1)
        labels = labels.to(device)
        return self._ce(logits, labels) + TripletLoss(margin=0.3)(feat_, labels)

    def describe(self) -> dict:
        return {**super().describe(), "split": "bounding_box_train", "identities": self.num_identities,
                "input_size": [self.height, self.width], "num_instances": self.num_instances}


# ---------------------------------------------------------------------------------------------
# Classification (ImageNet class folders)


class ClassificationTask(TrainTask):
    """Image classification on class folders ``DIR/train/<class>/*`` (or ``DIR/<class>/*``).

    Sample: resize the shorter side to input_size / crop_pct (as the evaluation), a random crop of
    ``input_size``, random horizontal flip (p 0.5; ``options['hflip']=False`` turns it off),
    normalisation. Loss: cross-entropy. The model's number of outputs must equal the number of
    class folders (labels are the sorted folder names, as the evaluation reads them).
    """

    protocol = "imagenet"

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        from zoo.data.imagefolder import ImageFolder

        root = self.data_dir / "train"
        if not root.is_dir():
            if (self.data_dir / str(self.options.get("split", "val"))).is_dir():
                raise DatasetError(f"expected the training class folders in {root} (beside the evaluation split)")
            root = self.data_dir  # DIR itself holds the class folders
        self.root = root
        self.folder = ImageFolder(root, limit=self.limit)
        self.height, self.width = _size_pair(self.preprocessing.get("input_size", (224, 224)), "input_size")
        self.crop_pct = float(self.preprocessing.get("crop_pct", 0.875))
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        self.mean = tuple(self.preprocessing.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.preprocessing.get("std", IMAGENET_STD))
        self.flip = bool(self.options.get("hflip", True))

    def __len__(self) -> int:
        return len(self.folder)

    def sample(self, index: int, gen: torch.Generator):
        from PIL import Image

        from zoo.data.imagefolder import load_rgb

        sample = self.folder.samples[index]
        image = load_rgb(sample.path)
        # the evaluation's resize (shorter side, or both sides for a non-square input), then a random crop
        if self.height == self.width:
            short = math.floor(self.height / self.crop_pct)
            scale = short / min(image.width, image.height)
            size = (max(self.width, round(image.width * scale)), max(self.height, round(image.height * scale)))
        else:
            size = (math.floor(self.width / self.crop_pct), math.floor(self.height / self.crop_pct))
        image = image.resize(size, Image.BILINEAR)
        image = _random_crop(image, self.height, self.width, gen)
        if self.flip and _uniform(gen) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(image, self.mean, self.std), sample.label

    def collate(self, samples: list):
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)

    def loss(self, model: nn.Module, batch, device) -> Tensor:
        images, labels = batch
        logits = model(images.to(device))
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise TypeError(f"classification training expects (B, num_classes) logits, got "
                            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
        if logits.shape[1] != len(self.folder.classes):
            raise DatasetError(f"{self.root} has {len(self.folder.classes)} class folders but the model has "
                               f"{logits.shape[1]} outputs; build it with num_classes={len(self.folder.classes)}")
        return F.cross_entropy(logits, labels.to(device))

    def describe(self) -> dict:
        return {**super().describe(), "split": self.root.name, "classes": len(self.folder.classes),
                "input_size": [self.height, self.width]}


# ---------------------------------------------------------------------------------------------
# Video classification (Something-Something frame folders)


_SS_TRAIN_LISTS = ("something_train_cluster.txt", "something_v2_train_cluster.txt", "train_videofolder.txt")


class VideoTask(TrainTask):
    """Video classification on Something-Something frame folders (spec rsa §2.3, §4).

    Clips: ``T`` = ``num_segments`` frames (model kwarg, or preprocessing ``num_frames``; default
    8) by the original's training sampling (avg = n // T; index_i = i * avg + U{0..avg-1}, or all
    the first frame when n < T), frames ``img_{:05d}.jpg`` 1-based. Each frame is resized to
    preprocessing ``resize`` [H, W] (default input_size / 0.875), the same random ``input_size``
    crop is taken from every frame, then normalisation. No flip: left/right are classes.
    Input layout: (B, 3 * T, H, W), channel 3 t + c (TSN's stacking, spec rsa §2.2).
    Loss: cross-entropy.
    """

    protocol = "ssv"

    def __init__(self, data_dir: Path, *, num_segments: int = 8, **kwargs):
        super().__init__(data_dir, **kwargs)
        name = self.options.get("train_list")
        candidates = [name] if name else list(_SS_TRAIN_LISTS)
        if self.options.get("dataset") == "ssv2":
            candidates.reverse()  # an SSv2 folder may hold both lists
        for candidate in candidates:
            if (self.data_dir / candidate).is_file():
                self.list_file = self.data_dir / candidate
                break
        else:
            raise DatasetError(f"expected a Something-Something training list in {self.data_dir} "
                               f"({' or '.join(candidates)}: '<video_dir> <num_frames> <label>' a line)")
        from zoo.data.ssv import read_split

        clips = read_split(self.list_file, self.data_dir)
        self.clips = clips[:self.limit] if self.limit is not None else clips
        self.num_segments = int(num_segments)
        self.height, self.width = _size_pair(self.preprocessing.get("input_size", (224, 224)), "input_size")
        default_resize = [math.floor(self.height / 0.875), math.floor(self.width / 0.875)]
        self.resize = _size_pair(self.preprocessing.get("resize", default_resize), "resize")
        if self.resize[0] < self.height or self.resize[1] < self.width:
            raise ValueError(f"preprocessing resize {list(self.resize)} must be at least input_size "
                             f"{[self.height, self.width]} (the crop is taken from the resized frames)")
        if self.num_segments < 1:
            raise ValueError(f"num_segments must be a positive int, got {self.num_segments}")
        self.mean = tuple(self.preprocessing.get("mean", IMAGENET_MEAN))
        self.std = tuple(self.preprocessing.get("std", IMAGENET_STD))
        self.prefix = str(self.preprocessing.get("frame_prefix", "img_"))

    def __len__(self) -> int:
        return len(self.clips)

    def frame_indices(self, num_frames: int, gen: torch.Generator) -> list[int]:
        """1-based frame numbers of the T segments (the original's training sampling)."""
        t = self.num_segments
        avg = num_frames // t
        if avg == 0:
            return [1] * t
        return [i * avg + _randint(gen, 0, avg - 1) + 1 for i in range(t)]

    def sample(self, index: int, gen: torch.Generator):
        from PIL import Image

        from zoo.data.imagefolder import load_rgb

        clip = self.clips[index]
        numbers = self.frame_indices(clip.num_frames, gen)
        frames = [load_rgb(clip.path / f"{self.prefix}{i:05d}.jpg") for i in numbers]
        h, w = self.resize
        left, top = _randint(gen, 0, w - self.width), _randint(gen, 0, h - self.height)
        tensors = [_to_tensor(f.resize((w, h), Image.BILINEAR).crop((left, top, left + self.width, top + self.height)),
                              self.mean, self.std) for f in frames]
        return torch.cat(tensors, dim=0), clip.label  # (3T, H, W)

    def collate(self, samples: list):
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)

    def loss(self, model: nn.Module, batch, device) -> Tensor:
        clips, labels = batch
        logits = model(clips.to(device))
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise TypeError("video training expects (B, num_classes) logits")
        if int(labels.max()) >= logits.shape[1]:
            raise DatasetError(f"{self.list_file} has label {int(labels.max())} but the model has {logits.shape[1]} classes")
        return F.cross_entropy(logits, labels.to(device))

    def describe(self) -> dict:
        return {**super().describe(), "split": self.list_file.name, "num_segments": self.num_segments,
                "input_size": [self.height, self.width]}


# =============================================================================================
# Choosing the task


def _is_torchvision_detector(model: nn.Module) -> bool:
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, GeneralizedRCNN)


def build_task(model: nn.Module, model_config, data_dir: Union[str, Path], *, batch_size: int, seed: int = 0,
               limit: Optional[int] = None, preprocessing: Optional[dict] = None, num_instances: int = 4,
               model_kwargs: Optional[dict] = None) -> TrainTask:
    """The training task for ``model`` by its config's ``eval.protocol``.

    ``preprocessing`` entries override the config's (e.g. a smaller ``input_size`` for a test
    model); ``model_kwargs`` are the constructor kwargs (checked against the input size, and
    ``num_segments`` for video).
    """
    options = dict(model_config.eval or {})
    protocol = options.pop("protocol", None)
    pre = {**(model_config.preprocessing or {}), **(preprocessing or {})}
    model_kwargs = dict(model_kwargs or {})
    if protocol == "reid" and "height" in model_kwargs and "width" in model_kwargs \
            and "input_size" not in (preprocessing or {}):
        # the RGA modules are built for one size: train at the size the model was built for
        pre["input_size"] = [model_kwargs["height"], model_kwargs["width"]]
    common = dict(batch_size=batch_size, seed=seed, limit=limit, preprocessing=pre, options=options)
    if protocol == "coco":
        task_cls = TorchvisionDetectionTask if _is_torchvision_detector(model) else DetrTask
        return task_cls(Path(data_dir), **common)
    if protocol == "reid":
        task = ReidTask(Path(data_dir), num_instances=num_instances, **common)
        if "height" in model_kwargs and (task.height, task.width) != (model_kwargs["height"], model_kwargs.get("width")):
            raise ValueError(f"re-id input_size {[task.height, task.width]} differs from the model's "
                             f"height x width {model_kwargs['height']} x {model_kwargs.get('width')}")
        return task
    if protocol == "imagenet":
        return ClassificationTask(Path(data_dir), **common)
    if protocol == "ssv":
        segments = model_kwargs.get("num_segments", pre.get("num_segments", pre.get("num_frames", 8)))
        return VideoTask(Path(data_dir), num_segments=int(segments), **common)
    raise ValueError(f"model '{model_config.name}' has eval protocol {protocol!r}; `zoo train` knows "
                     "coco (detection), reid, imagenet (classification) and ssv (video)")


# =============================================================================================
# The training loop


def _json_kwargs(kwargs: dict) -> dict:
    """Constructor kwargs as recorded in config.json (JSON types only; no download-on-build flags)."""
    out = {k: (False if k in _DOWNLOADING_KWARGS else v) for k, v in kwargs.items()}
    for key, value in out.items():
        try:
            json.dumps(value)
        except TypeError as exc:
            raise ValueError(f"model kwarg {key}={value!r} is not JSON-serialisable; a trained folder records its "
                             "constructor kwargs in config.json") from exc
    return out


def _dataset_record(data_dir: Path, task: TrainTask) -> dict:
    record = {"name": data_dir.resolve().name, **task.describe()}
    marker = data_dir / "synthetic.json"
    if marker.is_file():  # a generated dataset: enough to regenerate it
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            split = (info.get("splits") or {}).get("train") or {}
            record["synthetic"] = {"kind": info.get("kind"), "seed": split.get("seed"), "size": split.get("size")}
        except (OSError, ValueError):
            pass
    return record


class _Deterministic:
    """Context: seeds every generator and turns on deterministic algorithms; restores the flags after."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import random

        self.previous = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        # cuBLAS needs this to be deterministic; it only has an effect before CUDA initialises
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous[0], warn_only=self.previous[1])
        return False


def _lr_factor(step: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``: constant, or cosine decay to 1%."""
    if schedule == "constant" or total <= 1:
        return 1.0
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))


def train(name: str, data_dir: Union[str, Path], out_dir: Union[str, Path], *, epochs: int, batch_size: int,
          lr: float, seed: int = 0, limit: Optional[int] = None, device: Union[str, torch.device] = "cpu",
          weight_decay: float = 1e-4, lr_schedule: str = "cosine", max_grad_norm: Optional[float] = None,
          num_instances: int = 4, preprocessing: Optional[dict] = None,
          log: Optional[Callable[[str], None]] = print, **model_overrides) -> Path:
    """Train the registered model ``name`` from scratch on ``data_dir`` and write it to ``out_dir``.

    Args:
        name: a registered model (no ``.tag``: training starts from the constructor's initialisation).
        data_dir: the dataset in the format of the model's ``eval.protocol`` (see the module docstring).
        out_dir: output folder (new, empty, or an earlier RelZoo folder, which is replaced).
        epochs, batch_size, lr: the schedule; AdamW with ``weight_decay``, lr per step by ``lr_schedule``
            ('cosine': cosine decay to 1% over all steps, or 'constant').
        seed: seeds the initialisation, the sample order, augmentation and dropout.
        limit: train on the first ``limit`` samples only.
        device: 'cpu' (deterministic) or 'cuda'.
        max_grad_norm: gradient-norm clipping; None = the family default (0.1 for DETR as the
            original, none otherwise), 0 = off.
        num_instances: K of the re-id P x K batches.
        preprocessing: overrides of the config's preprocessing (e.g. ``{"input_size": [64, 32]}``).
        log: called with one line per epoch (None: silent).
        **model_overrides: constructor kwargs over the config's (recorded in config.json).

    Returns ``out_dir``; ``zoo.create_model(name, weights=out_dir)`` loads the result.
    """
    from zoo.factory import create_model
    from zoo.hub import model_card, write_model_folder
    from zoo.registry import model_info, split_name

    base, tag = split_name(name)
    if tag is not None:
        raise ValueError(f"train a model by its name without a weights tag ('{base}', not '{name}')")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    cfg = model_info(base)
    kwargs = _json_kwargs({**cfg.kwargs, **model_overrides})
    say = log or (lambda line: None)

    with _Deterministic(seed):
        model = create_model(base, **model_overrides).to(device)
        model.train()
        task = build_task(model, cfg, data_dir, batch_size=batch_size, seed=seed, limit=limit,
                          preprocessing=preprocessing, num_instances=num_instances, model_kwargs=kwargs)
        if max_grad_norm is None:
            max_grad_norm = 0.1 if isinstance(task, DetrTask) else 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(task.epoch_indices(0))
        total_steps = steps_per_epoch * epochs
        history, step = [], 0
        say(f"training {base} on {data_dir} ({task.protocol}, {len(task)} samples, {steps_per_epoch} steps/epoch)")
        for epoch in range(epochs):
            start, losses = time.perf_counter(), []
            for batch in task.batches(epoch):
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(step, total_steps, lr_schedule)
                loss = task.loss(model, batch, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}, step "
                                             f"{step + 1}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                losses.append(loss.item())
                step += 1
            history.append(float(np.mean(losses)))
            say(f"epoch {epoch + 1}/{epochs}  loss {history[-1]:.4f}  ({len(losses)} steps, "
                f"{time.perf_counter() - start:.1f} s)")
        model.eval()

    record = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
              "optimizer": "AdamW", "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "seed": seed,
              "limit": limit, "device": str(device), "preprocessing": dict(preprocessing or {}),
              "dataset": _dataset_record(data_dir, task), "final_loss": history[-1],
              "loss_per_epoch": [round(x, 6) for x in history], "torch": torch.__version__}
    if isinstance(task, ReidTask):
        record["num_instances"] = num_instances
    config = {"model": base, "kwargs": kwargs, "source": "trained by zoo train", "train": record}
    origin = (f"Trained from scratch by `python -m zoo train {base}` on `{record['dataset']['name']}` "
              f"({task.protocol} format, {len(task)} samples) for {epochs} epochs, seed {seed}; "
              f"final training loss {history[-1]:.4f}. Training hyper-parameters are in config.json.")
    return write_model_folder(out_dir, model.state_dict(), config, model_card(base, config, origin, ("trained",)))


# =============================================================================================
# CLI


def _cmd_train(args) -> int:
    overrides = json.loads(args.kwargs) if args.kwargs else {}
    preprocessing = json.loads(args.preprocessing) if args.preprocessing else None
    if not isinstance(overrides, dict):
        raise ValueError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    out = train(args.name, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, limit=args.limit, device=args.device, weight_decay=args.weight_decay,
                lr_schedule=args.lr_schedule, max_grad_norm=args.max_grad_norm, num_instances=args.num_instances,
                preprocessing=preprocessing, **overrides)
    print(f"wrote {out}")
    return 0


def add_cli(subparsers) -> None:
    """Add ``train NAME --data DIR --out DIR ...`` to ``python -m zoo``."""
    p = subparsers.add_parser(
        "train", help="train a model on a dataset (deterministic on CPU)",
        description="Train a registered model from scratch with its family's loss (set loss for DETR, "
                    "CE + triplet for re-id, CE for classification and video) on a dataset in the format "
                    "of its eval protocol, and write model.safetensors + config.json + README.md.")
    p.add_argument("name", help="registered model name")
    p.add_argument("--data", required=True, help="dataset root (the train split is read)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="gradient clipping (default: 0.1 for DETR, none otherwise; 0 = off)")
    p.add_argument("--num-instances", type=int, default=4, help="re-id: K images per identity in a batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="train on the first N samples only")
    p.add_argument("--kwargs", help="JSON constructor kwargs over the config's, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--preprocessing", help="JSON overrides of the config's preprocessing, e.g. '{\"input_size\": [64, 32]}'")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_train)
