"""Training tasks: the data and the loss of each family, registered by the name of the evaluation
protocol its models are evaluated with (``eval.protocol`` in the model config), as
:func:`zoo.eval.protocol.register_protocol` registers the protocols. A model trains on the dataset
format it is evaluated on:

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

Every random draw comes from a generator seeded by ``(seed, epoch, ...)``: the sample order and
each sample's augmentation (:mod:`zoo.data.transforms`), so the same (seed, epoch) always gives
the same batches.

Detectors pad a batch to its largest image. A detector trained only on such batches learns the
padding's borders and loses accuracy on images that are not padded (a batch of one, or the largest
image of a batch). ``same_size_batches`` (a fraction, detection tasks only) makes that share of each
epoch's batches out of images of nearly the same size, which are (nearly) unpadded, so the model
sees both kinds of border.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from zoo.config import ModelConfig, Preprocessing
from zoo.data.coco import CocoDetection
from zoo.data.config import create_transform, resolve_data_config
from zoo.data.imagefolder import ImageFolder, load_rgb
from zoo.data.reid import read_market1501_train
from zoo.data.ssv import read_split
from zoo.data.transforms import DEFAULT_NUM_FRAMES, DetectorTrainTransform, detr_resize_size, randint
from zoo.errors import ConfigError, DatasetError
from zoo.losses import CrossEntropyLabelSmooth, SetCriterion, TripletLoss, box_xyxy_to_cxcywh

__all__ = ["register_task", "build_task", "TrainTask", "CocoTask", "DetrTask", "TorchvisionDetectionTask",
           "ReidTask", "ClassificationTask", "VideoTask"]

_tasks: dict[str, type[TrainTask]] = {}


def register_task(protocol: str):
    """Class decorator: ``@register_task('reid')`` makes the class the training task of the models
    evaluated with that protocol."""

    def wrap(cls):
        cls.protocol = protocol
        _tasks[protocol] = cls
        return cls

    return wrap


# =============================================================================================
# Seeding


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer ``keys`` (numpy's SeedSequence mixes them well)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _cut(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches; an incomplete last batch is dropped unless it is the only one (a batch
    of one would break BatchNorm statistics and the set losses gain nothing from it)."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _batches_in_order(n: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """A seeded permutation of range(n) cut into batches (:func:`_cut`)."""
    return _cut(torch.randperm(n, generator=gen).tolist(), batch_size)


def _batches_partly_by_size(sizes: list[tuple[int, int]], batch_size: int, fraction: float,
                            gen: torch.Generator) -> list[list[int]]:
    """A seeded permutation of range(len(sizes)) whose first ``fraction`` of samples is sorted by size
    (stable, so equal sizes stay in random order) before both parts are cut into batches; the batches
    are then shuffled together. Batches of the sorted part hold images of (nearly) one size."""
    order = torch.randperm(len(sizes), generator=gen).tolist()
    split = int(round(fraction * len(order)))
    batches = _cut(sorted(order[:split], key=sizes.__getitem__), batch_size) + _cut(order[split:], batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


# =============================================================================================
# The interface


class TrainTask:
    """Training data and loss of one family.

    Subclasses read the train split in ``__init__`` and implement ``__len__``, :meth:`sample`
    (one augmented sample), :meth:`collate` (samples -> one batch) and :meth:`loss`.
    ``batches(epoch)`` yields the epoch's batches in a seeded order; the same (seed, epoch)
    always gives the same batches, augmentation included.
    """

    protocol = ""
    task = ""  # the model config's task whose augmentation this task uses (zoo.data.create_transform)

    def __init__(self, data_dir: Path, *, batch_size: int, seed: int = 0, limit: Optional[int] = None,
                 preprocessing: Optional[Mapping] = None, options: Optional[dict] = None,
                 same_size_batches: float = 0.0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if not (isinstance(same_size_batches, (int, float)) and 0 <= same_size_batches <= 1):
            raise ConfigError(f"same_size_batches must be a fraction in [0, 1], got {same_size_batches!r}")
        if same_size_batches and type(self).sample_size is TrainTask.sample_size:
            raise ConfigError(f"same_size_batches applies to detection training (padded batches); "
                              f"'{self.protocol}' batches are not padded")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.same_size_batches = float(same_size_batches)
        self.seed = int(seed)
        self.limit = limit
        self.preprocessing = Preprocessing.parse(preprocessing or {}, "training preprocessing")
        self.options = dict(options or {})

    @staticmethod
    def preprocessing_of_model(model_kwargs: dict) -> dict:
        """Preprocessing fields the model's constructor kwargs fix (over the config's, under explicit overrides)."""
        return {}

    def train_transform(self, **options):
        """The augmentation of :attr:`task` with this task's preprocessing: :func:`zoo.data.create_transform`
        (``is_training=True``) of :func:`zoo.data.resolve_data_config`; ``options`` (``hflip``) are its."""
        fields = {key: value for key, value in self.preprocessing.items() if key != "layout"}
        return create_transform(resolve_data_config(task=self.task, **fields), is_training=True, **options)

    @classmethod
    def for_model(cls, model: nn.Module, data_dir: Path, *, model_kwargs: dict, num_instances: int,
                  **common) -> TrainTask:
        """The task that trains ``model`` (built with ``model_kwargs``); ``common``: the ``__init__`` arguments."""
        return cls(data_dir, **common)

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

    def sample_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample ``index`` as the model gets it; tasks whose batches are padded implement it."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def epoch_indices(self, epoch: int) -> list[list[int]]:
        """The sample indices of each batch of ``epoch`` (``same_size_batches`` of them by size, module doc)."""
        if len(self) == 0:
            raise DatasetError(f"no training samples in {self.data_dir}")
        gen = _generator(self.seed, epoch, 0)
        if self.same_size_batches:
            sizes = [self.sample_size(i) for i in range(len(self))]
            return _batches_partly_by_size(sizes, self.batch_size, self.same_size_batches, gen)
        return _batches_in_order(len(self), self.batch_size, gen)

    def batches(self, epoch: int) -> Iterator:
        for step, indices in enumerate(self.epoch_indices(epoch)):
            yield self.collate([self.sample(i, _generator(self.seed, epoch, 1, step, slot))
                                for slot, i in enumerate(indices)])

    def describe(self) -> dict:
        """What the training record says about the data."""
        return {"format": self.protocol, "samples": len(self)}


def _stack_labelled(samples: list) -> tuple[Tensor, Tensor]:
    """[(tensor, int label), ...] -> (stacked tensors, int64 labels)."""
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.int64)


# =============================================================================================
# Detection (COCO format)


def _coco_train_split(options: dict) -> str:
    """The train split beside the evaluated one: 'val2017' -> 'train2017'."""
    split = str(options.get("split", "val2017"))
    return split.replace("val", "train") if "val" in split else "train2017"


@register_task("coco")
class CocoTask(TrainTask):
    """COCO-format images and their boxes (crowd boxes and empty boxes skipped). The model picks the
    loss: :class:`TorchvisionDetectionTask` for a torchvision detector, else :class:`DetrTask`."""

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.split = _coco_train_split(self.options)
        self.coco = CocoDetection(self.data_dir, self.split, limit=self.limit)
        self.flip = bool(self.options.get("hflip", True))

    @classmethod
    def for_model(cls, model: nn.Module, data_dir: Path, *, model_kwargs: dict, num_instances: int,
                  **common) -> TrainTask:
        task_cls = TorchvisionDetectionTask if isinstance(model, GeneralizedRCNN) else DetrTask
        return task_cls(data_dir, **common)

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

    def collate(self, samples: list):
        return [image for image, _ in samples], [target for _, target in samples]

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index`` from the annotation file (no image is read)."""
        info = self.coco.coco.imgs[self.coco.ids[index]]
        if not all(isinstance(info.get(k), int) for k in ("height", "width")):
            raise DatasetError(f"{self.coco.ann_file}: image {info.get('id')} has no integer height/width, which "
                               "same_size_batches needs")
        return info["height"], info["width"]

    def sample_size(self, index: int) -> tuple[int, int]:
        return self.image_size(index)

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split}


class DetrTask(CocoTask):
    """DETR training on COCO-format data (spec irpe §5.2).

    Sample: :class:`zoo.data.transforms.DetrTrainTransform` (random horizontal flip, DETR's resize
    from the model's preprocessing, normalisation). Targets: ``labels`` = COCO category ids (DETR
    predicts them directly), ``boxes`` normalised cxcywh. Loss: :class:`zoo.losses.SetCriterion`
    (Hungarian costs 1/5/2; CE with eos 0.1 + 5 L1 + 2 GIoU, on the final and every auxiliary
    decoder output).
    """

    task = "detection"

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.transform = self.train_transform(hflip=self.flip)
        self._criterion = None

    def sample_size(self, index: int) -> tuple[int, int]:
        height, width = self.image_size(index)
        return detr_resize_size(width, height, self.transform.resize_shorter, self.transform.max_size)

    def sample(self, index: int, gen: torch.Generator):
        image, boxes, labels = self.load(index)
        # normalised by the original size: the resize scales boxes and image alike
        scale = torch.tensor([image.width, image.height, image.width, image.height], dtype=torch.float32)
        tensor, boxes = self.transform(image, boxes, gen)
        return tensor, {"labels": labels, "boxes": box_xyxy_to_cxcywh(boxes / scale)}

    def loss(self, model: nn.Module, batch, device) -> Tensor:
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


class TorchvisionDetectionTask(CocoTask):
    """Training of a torchvision detector (Faster R-CNN: the hand-raising model) on COCO-format data.

    Sample: :class:`zoo.data.transforms.DetectorTrainTransform` (the image in [0, 1] at its own
    size, a random horizontal flip). Targets: ``boxes`` xyxy pixels, ``labels`` = category ids
    (0 is the detector's background). Loss: the sum of the loss dict ``model(images, targets)``
    returns in train mode (RPN objectness + box regression, ROI classification + box regression).
    """

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.transform = DetectorTrainTransform(hflip=self.flip)

    def sample(self, index: int, gen: torch.Generator):
        image, boxes, labels = self.load(index)
        tensor, boxes = self.transform(image, boxes, gen)
        return tensor, {"boxes": boxes, "labels": labels}

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


# =============================================================================================
# Re-id (Market-1501 layout)


@register_task("reid")
class ReidTask(TrainTask):
    """Re-id training as the RGA original (spec rga §2.2, §5.2), on a Market-1501 layout.

    Batches: P x K sampling - each epoch visits every identity once in a seeded random order and
    takes K (``num_instances``, default 4) of its images (without replacement, with it when it has
    fewer); P = batch_size / K identities a batch, incomplete batches dropped.
    Sample: :class:`zoo.data.transforms.ReidTrainTransform` (Random2DTranslation, random flip,
    normalisation), at the input size the model was built for (its ``height`` x ``width``).
    Loss: :class:`zoo.losses.CrossEntropyLabelSmooth` (eps 0.1) on the logits + :class:`zoo.losses.TripletLoss`
    (margin 0.3) on ``feat_``; the model in train mode returns ``(feat_, feat, logits)``.
    Labels are the training pids in sorted order mapped to 0..N-1; the model needs >= N classes.
    """

    task = "person re-identification"

    def __init__(self, data_dir: Path, *, num_instances: int = 4, **kwargs):
        super().__init__(data_dir, **kwargs)
        if not isinstance(num_instances, int) or num_instances < 1:
            raise ConfigError(f"num_instances (K) must be a positive int, got {num_instances!r}")
        if self.batch_size % num_instances:
            raise ConfigError(f"re-id batch_size ({self.batch_size}) must be a multiple of num_instances K "
                             f"({num_instances}): a batch is P identities x K images")
        self.num_instances = num_instances
        self.num_identities_per_batch = self.batch_size // num_instances
        if self.num_identities_per_batch < 2:
            raise ConfigError(f"re-id batches need P >= 2 identities for the triplet loss; batch_size "
                             f"{self.batch_size} / K {num_instances} = {self.num_identities_per_batch}")
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
        self.transform = self.train_transform()
        self.height, self.width = self.transform.height, self.transform.width
        self._ce = None

    @staticmethod
    def preprocessing_of_model(model_kwargs: dict) -> dict:
        # the RGA modules are built for one size: train at the size the model was built for
        if "height" in model_kwargs and "width" in model_kwargs:
            return {"input_size": [model_kwargs["height"], model_kwargs["width"]]}
        return {}

    @classmethod
    def for_model(cls, model: nn.Module, data_dir: Path, *, model_kwargs: dict, num_instances: int,
                  **common) -> TrainTask:
        task = cls(data_dir, num_instances=num_instances, **common)
        built_for = (model_kwargs.get("height"), model_kwargs.get("width"))
        if built_for[0] is not None and (task.height, task.width) != built_for:
            raise ConfigError(f"re-id input_size {[task.height, task.width]} differs from the model's "
                             f"height x width {built_for[0]} x {built_for[1]}")
        return task

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
        im = self.images[index]
        return self.transform(load_rgb(im.path), gen), self.label_of[im.pid]

    def collate(self, samples: list):
        return _stack_labelled(samples)

    def loss(self, model: nn.Module, batch, device) -> Tensor:
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


# =============================================================================================
# Classification (ImageNet class folders)


@register_task("imagenet")
class ClassificationTask(TrainTask):
    """Image classification on class folders ``DIR/train/<class>/*`` (or ``DIR/<class>/*``).

    Sample: :class:`zoo.data.transforms.ClassificationTrainTransform` (the evaluation's resize, a
    random ``input_size`` crop, random horizontal flip unless ``options['hflip']`` is False,
    normalisation). Loss: cross-entropy. The model's number of outputs must equal the number of
    class folders (labels are the sorted folder names, as the evaluation reads them).
    """

    task = "image classification"

    def __init__(self, data_dir: Path, **kwargs):
        super().__init__(data_dir, **kwargs)
        root = self.data_dir / "train"
        if not root.is_dir():
            if (self.data_dir / str(self.options.get("split", "val"))).is_dir():
                raise DatasetError(f"expected the training class folders in {root} (beside the evaluation split)")
            root = self.data_dir  # DIR itself holds the class folders
        self.root = root
        self.folder = ImageFolder(root, limit=self.limit)
        self.transform = self.train_transform(hflip=bool(self.options.get("hflip", True)))

    def __len__(self) -> int:
        return len(self.folder)

    def sample(self, index: int, gen: torch.Generator):
        sample = self.folder.samples[index]
        return self.transform(load_rgb(sample.path), gen), sample.label

    def collate(self, samples: list):
        return _stack_labelled(samples)

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
                "input_size": [self.transform.height, self.transform.width]}


# =============================================================================================
# Video classification (Something-Something frame folders)


_SS_TRAIN_LISTS = ("something_train_cluster.txt", "something_v2_train_cluster.txt", "train_videofolder.txt")


@register_task("ssv")
class VideoTask(TrainTask):
    """Video classification on Something-Something frame folders (spec rsa §2.3, §4).

    Clips: ``T`` = preprocessing ``num_frames`` (the model's ``num_segments``; default 16) frames
    by the original's training sampling (avg = n // T; index_i = i * avg + U{0..avg-1}, or all
    the first frame when n < T), frames ``<prefix>{:05d}.jpg`` 1-based (eval option ``prefix``,
    default ``img_``). Frames: :class:`zoo.data.transforms.VideoTrainTransform` (resize, one
    random crop for the whole clip, normalisation; no flip: left/right are classes).
    Input layout: (B, 3 * T, H, W), channel 3 t + c (TSN's stacking, spec rsa §2.2).
    Loss: cross-entropy.
    """

    task = "video classification"

    def __init__(self, data_dir: Path, **kwargs):
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
        clips = read_split(self.list_file, self.data_dir)
        self.clips = clips[:self.limit] if self.limit is not None else clips
        self.num_segments = self.preprocessing.num_frames or DEFAULT_NUM_FRAMES
        self.transform = self.train_transform()
        self.prefix = str(self.options.get("prefix", "img_"))

    @staticmethod
    def preprocessing_of_model(model_kwargs: dict) -> dict:
        # the model's head is built for num_segments frames
        return {"num_frames": model_kwargs["num_segments"]} if "num_segments" in model_kwargs else {}

    def __len__(self) -> int:
        return len(self.clips)

    def frame_indices(self, num_frames: int, gen: torch.Generator) -> list[int]:
        """1-based frame numbers of the T segments (the original's training sampling)."""
        t = self.num_segments
        avg = num_frames // t
        if avg == 0:
            return [1] * t
        return [i * avg + randint(gen, 0, avg - 1) + 1 for i in range(t)]

    def sample(self, index: int, gen: torch.Generator):
        clip = self.clips[index]
        frames = [load_rgb(clip.path / f"{self.prefix}{i:05d}.jpg") for i in self.frame_indices(clip.num_frames, gen)]
        return self.transform(frames, gen), clip.label  # (3T, H, W)

    def collate(self, samples: list):
        return _stack_labelled(samples)

    def loss(self, model: nn.Module, batch, device) -> Tensor:
        clips, labels = batch
        logits = model(clips.to(device))
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise TypeError("video training expects (B, num_classes) logits")
        if int(labels.max()) >= logits.shape[1]:
            raise DatasetError(f"{self.list_file} has label {int(labels.max())} but the model has "
                               f"{logits.shape[1]} classes")
        return F.cross_entropy(logits, labels.to(device))

    def describe(self) -> dict:
        return {**super().describe(), "split": self.list_file.name, "num_segments": self.num_segments,
                "input_size": [self.transform.height, self.transform.width]}


# =============================================================================================
# Choosing the task


def build_task(model: nn.Module, model_config: ModelConfig, data_dir: Union[str, Path], *, batch_size: int,
               seed: int = 0, limit: Optional[int] = None, preprocessing: Optional[Mapping] = None,
               num_instances: int = 4, model_kwargs: Optional[dict] = None, same_size_batches: float = 0.0) -> TrainTask:
    """The training task registered for the config's ``eval.protocol``, made for ``model``.

    The preprocessing is the config's, then what the constructor kwargs ``model_kwargs`` fix (the
    re-id input size, the video frames), then ``preprocessing`` (overrides, e.g. a smaller
    ``input_size`` for a test model).
    """
    options = dict(model_config.eval or {})
    protocol = options.pop("protocol", None)
    if protocol not in _tasks:
        raise ConfigError(f"model '{model_config.name}' has eval protocol {protocol!r}; `zoo train` knows "
                         f"{', '.join(sorted(_tasks))}")
    task_cls = _tasks[protocol]
    model_kwargs = dict(model_kwargs or {})
    pre = Preprocessing.parse({**model_config.preprocessing, **task_cls.preprocessing_of_model(model_kwargs),
                               **(preprocessing or {})}, "training preprocessing")
    return task_cls.for_model(model, Path(data_dir), model_kwargs=model_kwargs, num_instances=num_instances,
                              batch_size=batch_size, seed=seed, limit=limit, preprocessing=pre, options=options,
                              same_size_batches=same_size_batches)
