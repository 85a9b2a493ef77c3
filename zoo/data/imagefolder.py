"""ImageNet-style class folders, read as torchvision's ``ImageFolder`` does::

    DIR/<class_a>/<image>.JPEG
    DIR/<class_b>/<image>.JPEG
    ...

Classes are the sub-folder names in sorted order (for ImageNet the WordNet ids n01440764 ...
n15075141, i.e. the label order of every ImageNet checkpoint); images are the files with an image
extension in each class folder, sorted by name (sub-folders are searched too). Hidden files and
other files (e.g. ``Thumbs.db``) are ignored.

:func:`eval_transform` is the usual single-centre-crop evaluation: resize the shorter side to
``input_size / crop_pct``, centre crop ``input_size``, scale to [0, 1], normalise with mean/std.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence


from zoo.errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "find_classes", "eval_transform", "load_rgb"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_LAYOUT = "ImageNet-style class folders: DIR/<class>/<image>.JPEG (one sub-folder per class)"


def find_classes(root: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``root`` (DatasetError when there are none)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"expected the dataset folder {root} ({_LAYOUT}); it does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"expected class sub-folders in {root} ({_LAYOUT}); found none")
    return classes


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def load_rgb(path: str | Path):
    """Open an image as an RGB ``PIL.Image`` (grayscale / CMYK / palette files converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


@dataclass(frozen=True)
class _Sample:
    path: str
    label: int


class ImageFolder(Sequence):
    """Samples ``(image, label)`` of a class-folder dataset, in (class, file name) order.

    Args:
        root: the folder holding one sub-folder per class.
        transform: PIL image -> tensor (C, H, W); None returns the PIL image.
        classes: the class names to use, in label order (default: the sorted sub-folder names).
            A listed class without a folder is an error; folders not listed are skipped.
        limit: keep only the first ``limit`` samples.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None, limit: Optional[int] = None):
        self.root = Path(root)
        found = find_classes(self.root)
        if classes is None:
            classes = found
        else:
            missing = [c for c in classes if c not in found]
            if missing:
                raise DatasetError(f"expected class folder(s) {missing[:5]} in {self.root} ({_LAYOUT})")
        self.classes = list(classes)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = [_Sample(str(path), label) for label, name in enumerate(self.classes)
                   for path in _images_in(self.root / name)]
        if not samples:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {self.root} ({_LAYOUT})")
        self.samples = samples[:limit] if limit is not None else samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = load_rgb(sample.path)
        return (self.transform(image) if self.transform is not None else image), sample.label


def eval_transform(input_size: Sequence[int] | int = 224, crop_pct: float = 0.875,
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                   interpolation: str = "bilinear") -> Callable:
    """Resize the shorter side to ``size / crop_pct``, centre crop ``input_size`` (H, W), tensor, normalise.

    Returns a callable PIL image -> float tensor (3, H, W). ``crop_pct=1`` crops nothing beyond the resize.
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
             "nearest": InterpolationMode.NEAREST}
    if interpolation not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    # square: the shorter side (aspect kept); otherwise both sides scaled by 1 / crop_pct
    size = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return transforms.Compose([
        transforms.Resize(size, interpolation=modes[interpolation]),
        transforms.CenterCrop((h, w)),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ])
