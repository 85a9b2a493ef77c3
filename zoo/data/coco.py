"""COCO 2017 detection data in its original on-disk layout.

Layout (what DETR's ``--coco_path`` points at)::

    DIR/annotations/instances_val2017.json
    DIR/val2017/000000000139.jpg ...        or   DIR/val2017.zip  (holding val2017/*.jpg)

The zip form is the one the iRPE README allows; members are found by file name, whatever
folder they sit in inside the archive.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import torch

# DETR's preprocessing lives with the other transforms; re-exported for the callers that import it from here
from zoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, detr_eval_transform, detr_resize_size  # noqa: F401
from zoo.errors import DatasetError

# The 80 COCO categories by their dataset ids (1..90, with gaps); DETR predicts these ids directly.
COCO_CATEGORY_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}
#: Name of each of DETR's 91 class ids (0..90); 'N/A' for ids COCO does not use.
COCO_CLASSES = [COCO_CATEGORY_NAMES.get(i, "N/A") for i in range(91)]

class _ImageSource:
    """Reads image files from a folder or from a zip archive (opened lazily, once per process)."""

    def __init__(self, folder: Optional[Path], archive: Optional[Path]):
        self.folder, self.archive = folder, archive
        self._zip = None
        self._zip_pid = None
        self._members: dict[str, str] = {}

    def __getstate__(self):  # a ZipFile handle must not travel to DataLoader workers
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DatasetError(f"cannot open COCO image archive {self.archive}: {exc}") from exc
            self._zip_pid = os.getpid()
            self._members = {Path(n).name: n for n in self._zip.namelist() if not n.endswith("/")}
        return self._zip

    def read(self, file_name: str) -> bytes:
        if self.folder is not None:
            path = self.folder / file_name
            try:
                return path.read_bytes()
            except OSError as exc:
                raise DatasetError(f"COCO image {path} listed in the annotations cannot be read: {exc}") from exc
        archive = self._open_zip()
        member = self._members.get(Path(file_name).name)
        if member is None:
            raise DatasetError(f"COCO image '{file_name}' listed in the annotations is not in {self.archive}")
        return archive.read(member)


class CocoDetection(torch.utils.data.Dataset):
    """COCO images in sorted image-id order (as DETR's dataset), with the annotation file's COCO api.

    Args:
        root: the COCO folder (``annotations/`` plus ``<split>/`` or ``<split>.zip``).
        split: 'val2017' (default) or 'train2017'.
        transform: f(PIL RGB image) -> sample; default returns the PIL image.
        limit: keep only the first ``limit`` images.

    ``dataset[i]`` -> (transform(image), {"image_id": int, "orig_size": (h, w)}).
    ``.coco`` is the ``pycocotools.coco.COCO`` of the annotation file.
    """

    def __init__(self, root, split: str = "val2017", transform=None, limit: Optional[int] = None):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        layout = (f"COCO 2017 layout: {self.root}/annotations/instances_{split}.json and images in "
                  f"{self.root}/{split}/ or {self.root}/{split}.zip")
        if not self.root.is_dir():
            raise DatasetError(f"COCO folder {self.root} does not exist; expected the {layout}")
        if not self.ann_file.is_file():
            raise DatasetError(f"expected {self.ann_file} ({layout})")
        folder, archive = self.root / split, self.root / f"{split}.zip"
        if folder.is_dir():
            self.images = _ImageSource(folder, None)
        elif archive.is_file():
            self.images = _ImageSource(None, archive)
        else:
            raise DatasetError(f"expected the images in {folder}/ or {archive} ({layout})")
        self.coco = load_coco_api(self.ann_file)
        self.ids = sorted(self.coco.imgs)
        if limit is not None:
            self.ids = self.ids[:max(int(limit), 0)]

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int):
        """The PIL RGB image and its meta for position ``index``."""
        from PIL import Image, UnidentifiedImageError

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        data = self.images.read(info["file_name"])
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"COCO image '{info['file_name']}' (id {image_id}) is not a readable image: {exc}") from exc
        return image, {"image_id": int(image_id), "orig_size": (image.height, image.width)}

    def __getitem__(self, index: int):
        image, meta = self.load_image(index)
        return (self.transform(image) if self.transform is not None else image), meta


def load_coco_api(ann_file: Path):
    """``pycocotools.coco.COCO`` for an annotation file, quietly; DatasetError for a malformed one."""
    import contextlib

    try:
        from pycocotools.coco import COCO
    except ImportError as exc:  # the 'coco' extra
        raise DatasetError("COCO evaluation needs pycocotools: pip install 'relzoo[coco]'") from exc
    try:
        data = json.loads(Path(ann_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{ann_file} is not a readable COCO annotation JSON: {exc}") from exc
    missing = [k for k in ("images", "annotations", "categories") if k not in data] if isinstance(data, dict) else ["images"]
    if missing:
        raise DatasetError(f"{ann_file} is not a COCO instances file: missing {missing}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
