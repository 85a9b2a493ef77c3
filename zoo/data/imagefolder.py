"""ImageNet-style class folders, read as torchvision's ``ImageFolder`` does::

    DIR/<class_a>/<image>.JPEG
    DIR/<class_b>/<image>.JPEG
    ...

Classes are the sub-folder names in sorted order (for ImageNet the WordNet ids n01440764 ...
n15075141, i.e. the label order of every ImageNet checkpoint); images are the files with an image
extension in each class folder, sorted by name (sub-folders are searched too). Hidden files and
other files (e.g. ``Thumbs.db``) are ignored.

The evaluation transform (:func:`zoo.data.transforms.eval_transform`, re-exported here) is the
usual single centre crop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from zoo.data.transforms import eval_transform  # noqa: F401  (re-exported)
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
