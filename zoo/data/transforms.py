"""Preprocessing in one place: the ImageNet mean and std, and every transform the readers, the
evaluation protocols, the training tasks and ``predict`` apply, made from a model's
:class:`~zoo.config.Preprocessing`.

A field the config leaves unstated takes the default of the original pipeline (the constants
below). Images come in as PIL RGB and leave as float32 tensors (3, H, W): pixels scaled to
[0, 1], then normalised per channel; a video clip of T frames is (3T, H, W), channel 3 t + c
(TSN's stacking, spec rsa §2.2).

Evaluation (deterministic, picklable for DataLoader workers):

- :func:`detection_eval_transform`: DETR's val resize (:func:`detr_resize_size`), normalise;
- :func:`classification_eval_transform`: resize to input_size / crop_pct, centre crop, normalise;
- :func:`reid_eval_transform`: resize to exactly input_size (PIL bilinear), normalise;
- :class:`VideoEvalTransform`: frames resized to exactly ``resize``, centre crop, normalise.

Training augmentation draws every random number from the ``torch.Generator`` it is given (torch's
default one when none is), so the caller's seed fixes a sample: :class:`DetrTrainTransform`, :class:`DetectorTrainTransform`,
:class:`ReidTrainTransform`, :class:`ClassificationTrainTransform`, :class:`VideoTrainTransform`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zoo.config import Preprocessing
from zoo.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Defaults of the unstated fields, by task (the originals' values).
DETR_RESIZE_SHORTER = 800
DETR_MAX_SIZE = 1333
DEFAULT_INPUT_SIZE = (224, 224)  # classification; the crop of a video frame
DEFAULT_CROP_PCT = 0.875  # 224 / 256
REID_INPUT_SIZE = (256, 128)
VIDEO_EVAL_RESIZE = (240, 320)  # the SSv1/v2 frames' own size
DEFAULT_NUM_FRAMES = 16
DEFAULT_INTERPOLATION = "bilinear"

_PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _mean_std(pre: Preprocessing) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(pre.mean or IMAGENET_MEAN), tuple(pre.std or IMAGENET_STD)


def _require_bilinear(pre: Preprocessing, what: str) -> None:
    """Re-id and video resize with PIL bilinear, as their originals do; another interpolation is a config error."""
    if (pre.interpolation or DEFAULT_INTERPOLATION) != "bilinear":
        raise ConfigError(f"{what}: the original resizes with PIL bilinear; got interpolation {pre.interpolation!r}")


# =============================================================================================
# Pieces


def to_tensor(image) -> Tensor:
    """PIL RGB (W x H) -> (3, H, W) float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def normalize(tensor: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(..., 3, H, W) -> (tensor - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def uniform(gen: Optional[torch.Generator]) -> float:
    """Uniform float in [0, 1) (``gen`` None: torch's default generator)."""
    return float(torch.rand((), generator=gen))


def randint(gen: Optional[torch.Generator], low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def random_crop(image, height: int, width: int, gen: Optional[torch.Generator]):
    """A random ``height`` x ``width`` crop of a PIL image at least that large."""
    left = randint(gen, 0, image.width - width)
    top = randint(gen, 0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Mirror (n, 4) xyxy boxes horizontally inside an image ``width`` wide."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def _random_hflip(image, boxes: Tensor, gen: Optional[torch.Generator]):
    """With p 0.5, the mirrored image and its mirrored (n, 4) xyxy pixel boxes."""
    if uniform(gen) < 0.5:
        return image.transpose(Image.FLIP_LEFT_RIGHT), hflip_boxes(boxes, image.width)
    return image, boxes


def _resize_exactly(image, height: int, width: int):
    """PIL bilinear resize to ``height`` x ``width`` (aspect ratio not kept); an image of that size is kept."""
    return image if image.size == (width, height) else image.resize((width, height), Image.BILINEAR)


# =============================================================================================
# Evaluation


def detr_resize_size(width: int, height: int, size: int = DETR_RESIZE_SHORTER,
                     max_size: Optional[int] = DETR_MAX_SIZE) -> tuple[int, int]:
    """(new_height, new_width) of DETR's resize (spec irpe §5.4).

    The shorter side becomes ``size`` unless the longer side would then exceed ``max_size``
    (then shorter = round(max_size * short / long)); the longer side is int(shorter * long / short)
    (truncated). An image whose shorter side already equals the target is left as is.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def detr_eval_transform(image, size: int = DETR_RESIZE_SHORTER, max_size: Optional[int] = DETR_MAX_SIZE,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                        interpolation: str = DEFAULT_INTERPOLATION) -> Tensor:
    """PIL RGB image -> normalised (3, H', W') float tensor: DETR's val transform (resize, ToTensor, Normalize)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    new_h, new_w = detr_resize_size(image.width, image.height, size, max_size)
    if (new_h, new_w) != (image.height, image.width):
        image = TF.resize(image, [new_h, new_w], interpolation=InterpolationMode(interpolation))
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def detection_eval_transform(pre: Preprocessing) -> Callable[..., Tensor]:
    """DETR's val transform with the stated ``resize_shorter`` (800), ``max_size`` (1333), mean, std, interpolation."""
    mean, std = _mean_std(pre)
    return partial(detr_eval_transform, size=pre.resize_shorter or DETR_RESIZE_SHORTER,
                   max_size=pre.max_size or DETR_MAX_SIZE, mean=mean, std=std,
                   interpolation=pre.interpolation or DEFAULT_INTERPOLATION)


def eval_transform(input_size: Sequence[int] | int = DEFAULT_INPUT_SIZE, crop_pct: float = DEFAULT_CROP_PCT,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = DEFAULT_INTERPOLATION) -> Callable[..., Tensor]:
    """Resize the shorter side to ``size / crop_pct``, centre crop ``input_size`` (H, W), tensor, normalise.

    Returns a callable PIL image -> float tensor (3, H, W). ``crop_pct=1`` crops nothing beyond the resize.
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if interpolation not in _PIL_RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_PIL_RESAMPLE)}, got {interpolation!r}")
    # square: the shorter side (aspect kept); otherwise both sides scaled by 1 / crop_pct
    size = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return transforms.Compose([
        transforms.Resize(size, interpolation=InterpolationMode(interpolation)),
        transforms.CenterCrop((h, w)),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ])


def classification_eval_transform(pre: Preprocessing) -> Callable[..., Tensor]:
    """The single centre crop with the stated ``input_size`` (224), ``crop_pct`` (0.875), mean, std, interpolation."""
    mean, std = _mean_std(pre)
    return eval_transform(pre.input_size or DEFAULT_INPUT_SIZE, pre.crop_pct or DEFAULT_CROP_PCT, mean, std,
                          pre.interpolation or DEFAULT_INTERPOLATION)


def _resize_normalize(image, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return normalize(to_tensor(_resize_exactly(image, *size)), mean, std)


def reid_eval_transform(pre: Preprocessing) -> Callable[..., Tensor]:
    """Re-id test images (spec rga §5.1): PIL bilinear resize to exactly ``input_size`` (256 x 128), normalise."""
    _require_bilinear(pre, "re-id")
    mean, std = _mean_std(pre)
    return partial(_resize_normalize, size=tuple(pre.input_size or REID_INPUT_SIZE), mean=mean, std=std)


class VideoEvalTransform:
    """The RSA original's SSv1/v2 validation frames (spec rsa §4): every frame resized to exactly
    ``resize`` (240 x 320; PIL bilinear, aspect ratio not kept), a centre crop of input_size's
    height (224) squared; a clip's frames stacked along channels and normalised.
    """

    def __init__(self, pre: Preprocessing = Preprocessing()):
        _require_bilinear(pre, "video")
        self.num_frames = pre.num_frames or DEFAULT_NUM_FRAMES  # frames of a clip (the sampling is the reader's)
        self.resize = tuple(pre.resize or VIDEO_EVAL_RESIZE)
        self.crop = (pre.input_size or DEFAULT_INPUT_SIZE)[0]
        if self.crop > min(self.resize):
            raise ConfigError(f"video crop {self.crop} must fit in the resized frames {list(self.resize)}")
        self.mean, self.std = _mean_std(pre)

    def frame(self, image) -> Tensor:
        """PIL RGB frame -> (3, crop, crop) uint8: resize, then centre crop (torchvision's CenterCrop rounding)."""
        h, w = self.resize
        image = image.resize((w, h), Image.BILINEAR)
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(self.crop, self.crop, 3).permute(2, 0, 1)

    def clip(self, frames: Sequence[Tensor]) -> Tensor:
        """T frames from :meth:`frame` -> (3T, crop, crop) float32, channel 3 t + c."""
        clip = torch.stack(list(frames)).float().div_(255.0)  # (T, 3, crop, crop)
        return normalize(clip, self.mean, self.std).reshape(-1, self.crop, self.crop)

    def __call__(self, frames: Sequence) -> Tensor:
        """T PIL RGB frames -> (3T, crop, crop): :meth:`frame` each, then :meth:`clip`."""
        return self.clip([self.frame(image) for image in frames])


# =============================================================================================
# Training augmentation


class DetrTrainTransform:
    """DETR training (spec irpe §5.2): a random horizontal flip (p 0.5; ``hflip=False``: none), DETR's
    resize (:func:`detr_resize_size` with the stated ``resize_shorter`` / ``max_size``), normalisation.

    ``(image, boxes (n, 4) xyxy pixels, gen) -> (image (3, H', W'), boxes)``: the boxes flipped with
    the image and still in pixels of the input image (the resize scales boxes and image alike).
    """

    def __init__(self, pre: Preprocessing, hflip: bool = True):
        self.resize_shorter = pre.resize_shorter or DETR_RESIZE_SHORTER
        self.max_size = pre.max_size or DETR_MAX_SIZE
        self.resample = _PIL_RESAMPLE[pre.interpolation or DEFAULT_INTERPOLATION]
        self.mean, self.std = _mean_std(pre)
        self.hflip = hflip

    def __call__(self, image, boxes: Tensor, gen: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        if self.hflip:
            image, boxes = _random_hflip(image, boxes, gen)
        new_h, new_w = detr_resize_size(image.width, image.height, self.resize_shorter, self.max_size)
        if (new_h, new_w) != (image.height, image.width):
            image = image.resize((new_w, new_h), self.resample)
        return normalize(to_tensor(image), self.mean, self.std), boxes


class DetectorTrainTransform:
    """A torchvision detector's training sample: the image in [0, 1] at its own size (the detector
    resizes and normalises it itself) and a random horizontal flip (p 0.5; ``hflip=False``: none).

    ``(image, boxes (n, 4) xyxy pixels, gen) -> (image (3, H, W), boxes)``.
    """

    def __init__(self, hflip: bool = True):
        self.hflip = hflip

    def __call__(self, image, boxes: Tensor, gen: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        if self.hflip:
            image, boxes = _random_hflip(image, boxes, gen)
        return to_tensor(image), boxes


class ReidTrainTransform:
    """Re-id training as the RGA original (spec rga §2.2): with p 0.5 resize to 1.125 x ``input_size``
    (256 x 128) and take a random crop, else resize to it (Random2DTranslation); a random horizontal
    flip; normalisation. (The original's random erasing is left out.) ``(image, gen) -> (3, H, W)``.
    """

    def __init__(self, pre: Preprocessing):
        _require_bilinear(pre, "re-id")
        self.height, self.width = pre.input_size or REID_INPUT_SIZE
        self.mean, self.std = _mean_std(pre)

    def __call__(self, image, gen: Optional[torch.Generator] = None) -> Tensor:
        if uniform(gen) < 0.5:  # Random2DTranslation
            big = image.resize((round(self.width * 1.125), round(self.height * 1.125)), Image.BILINEAR)
            image = random_crop(big, self.height, self.width, gen)
        else:
            image = _resize_exactly(image, self.height, self.width)
        if uniform(gen) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(image), self.mean, self.std)


class ClassificationTrainTransform:
    """Classification training: the evaluation's resize (the shorter side to input_size / crop_pct, or
    both sides for a non-square input), a random ``input_size`` crop, a random horizontal flip (p 0.5;
    ``hflip=False``: none), normalisation. ``(image, gen) -> (3, H, W)``.
    """

    def __init__(self, pre: Preprocessing, hflip: bool = True):
        self.height, self.width = pre.input_size or DEFAULT_INPUT_SIZE
        self.crop_pct = pre.crop_pct or DEFAULT_CROP_PCT
        self.resample = _PIL_RESAMPLE[pre.interpolation or DEFAULT_INTERPOLATION]
        self.mean, self.std = _mean_std(pre)
        self.hflip = hflip

    def __call__(self, image, gen: Optional[torch.Generator] = None) -> Tensor:
        if self.height == self.width:
            short = math.floor(self.height / self.crop_pct)
            scale = short / min(image.width, image.height)
            size = (max(self.width, round(image.width * scale)), max(self.height, round(image.height * scale)))
        else:
            size = (math.floor(self.width / self.crop_pct), math.floor(self.height / self.crop_pct))
        image = random_crop(image.resize(size, self.resample), self.height, self.width, gen)
        if self.hflip and uniform(gen) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(to_tensor(image), self.mean, self.std)


class VideoTrainTransform:
    """Video training (spec rsa §2.3): every frame resized to exactly ``resize`` (default input_size /
    0.875; PIL bilinear), the same random ``input_size`` crop taken from every frame, normalisation.
    No flip: left and right are classes. ``(frames, gen) -> (3T, H, W)``, channel 3 t + c.
    """

    def __init__(self, pre: Preprocessing):
        _require_bilinear(pre, "video")
        self.height, self.width = pre.input_size or DEFAULT_INPUT_SIZE
        self.resize = tuple(pre.resize or (math.floor(self.height / DEFAULT_CROP_PCT),
                                           math.floor(self.width / DEFAULT_CROP_PCT)))
        self.mean, self.std = _mean_std(pre)

    def __call__(self, frames: Sequence, gen: Optional[torch.Generator] = None) -> Tensor:
        h, w = self.resize
        left, top = randint(gen, 0, w - self.width), randint(gen, 0, h - self.height)
        box = (left, top, left + self.width, top + self.height)
        return torch.cat([normalize(to_tensor(frame.resize((w, h), Image.BILINEAR).crop(box)), self.mean, self.std)
                          for frame in frames], dim=0)
