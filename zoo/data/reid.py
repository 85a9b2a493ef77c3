"""Readers for the person re-id test sets in their original on-disk formats (spec rga §5).

Each reader returns a :class:`ReidSplit`: the query and the gallery as lists of
:class:`ReidImage` (path, person id, camera id) in the order the original evaluates them
(rows / columns of the distance matrix).

CUHK03, new "767/700" protocol (Zhong et al., CVPR 2017)::

    DIR/cuhk03_new_protocol_config_labeled.mat     train_idx, query_idx, gallery_idx (1-based),
    DIR/cuhk03_new_protocol_config_detected.mat    labels, filelist  (MATLAB v5 .mat)
    DIR/images_labeled/<campair>_<pid:03d>_<view>_<img:02d>.png    images extracted from
    DIR/images_detected/...                                        cuhk03_release/cuhk-03.mat

  Query / gallery keep the ``labels`` of the .mat file; the camera id is the ``<view>`` field of
  the file name (1 or 2); order = the order of ``query_idx`` / ``gallery_idx``.

Market-1501::

    DIR/bounding_box_test/<pid:04d>_c<cam>s<seq>_<frame:06d>_<box:02d>.jpg    gallery
    DIR/query/...                                                           queries
    (DIR may also be the parent folder holding Market-1501-v15.09.15/)

  pid ``-1`` = junk: dropped from the gallery (the official junk rule, as open-reid-style
  loaders apply it); pid ``0000`` = distractor: kept, an ordinary non-match. Files in sorted
  name order; other files (e.g. ``Thumbs.db``) are ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from zoo.config import Preprocessing
from zoo.data.imagefolder import load_rgb
from zoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, REID_INPUT_SIZE, reid_eval_transform
from zoo.errors import ConfigError, DatasetError

__all__ = ["ReidImage", "ReidSplit", "read_cuhk03", "read_market1501", "read_reid_dataset", "load_reid_image",
           "REID_DATASETS"]

REID_DATASETS = ("cuhk03_labeled", "cuhk03_detected", "market1501")

_CUHK03_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.png$")
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s\d+_\d+_\d+\.jpg$", re.IGNORECASE)


@dataclass(frozen=True)
class ReidImage:
    path: str
    pid: int
    camid: int


@dataclass(frozen=True)
class ReidSplit:
    name: str
    query: tuple  # ReidImage, ...
    gallery: tuple  # ReidImage, ...


# ---------------------------------------------------------------------------------------------
# CUHK03


def _mat_vector(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        raise DatasetError(f"{path}: missing variable '{key}' (expected the CUHK03 new-protocol config with "
                           "train_idx, query_idx, gallery_idx, labels, filelist)")
    return np.asarray(mat[key]).reshape(-1)


def _mat_string(entry) -> str:
    """A MATLAB cell entry (scipy.io.loadmat nests it in 1-element arrays) -> str."""
    while isinstance(entry, np.ndarray):
        if entry.size != 1:
            raise DatasetError(f"expected a file name string in 'filelist', got an array of shape {entry.shape}")
        entry = entry.reshape(-1)[0]
    return str(entry)


def read_cuhk03(data_dir, subset: str = "labeled") -> ReidSplit:
    """CUHK03 new protocol, ``subset`` 'labeled' or 'detected' (layout in the module docstring)."""
    if subset not in ("labeled", "detected"):
        raise ConfigError(f"CUHK03 subset must be 'labeled' or 'detected', got {subset!r}")
    data_dir = Path(data_dir)
    config = data_dir / f"cuhk03_new_protocol_config_{subset}.mat"
    images = data_dir / f"images_{subset}"
    if not config.is_file():
        raise DatasetError(f"expected {config} (CUHK03 new 767/700 protocol split, MATLAB .mat with train_idx, "
                           "query_idx, gallery_idx, labels, filelist)")
    if not images.is_dir():
        hint = " (extract the images from cuhk03_release/cuhk-03.mat first)" if (
            data_dir / "cuhk03_release" / "cuhk-03.mat").is_file() else ""
        raise DatasetError(f"expected folder {images} with the CUHK03 {subset} images named "
                           f"<campair>_<pid:03d>_<view>_<img:02d>.png{hint}")
    try:
        from scipy.io import loadmat

        mat = loadmat(str(config))
    except ImportError as exc:  # pragma: no cover - scipy is a dependency of the eval extra
        raise DatasetError("reading the CUHK03 protocol .mat file needs scipy (pip install scipy)") from exc
    except Exception as exc:  # scipy raises several types for a corrupt file
        raise DatasetError(f"{config}: not a readable MATLAB .mat file ({exc})") from exc
    labels = _mat_vector(mat, "labels", config).astype(np.int64)
    filelist = [_mat_string(f) for f in _mat_vector(mat, "filelist", config)]
    if len(filelist) != len(labels):
        raise DatasetError(f"{config}: 'filelist' has {len(filelist)} entries but 'labels' has {len(labels)}")

    def subset_images(key: str) -> tuple:
        out = []
        for index in _mat_vector(mat, key, config).astype(np.int64):
            if not 1 <= index <= len(filelist):  # MATLAB indices are 1-based
                raise DatasetError(f"{config}: '{key}' holds index {index}, outside 1..{len(filelist)}")
            name = filelist[index - 1]
            match = _CUHK03_NAME.match(name)
            if match is None:
                raise DatasetError(f"{config}: file name '{name}' is not <campair>_<pid>_<view>_<img>.png")
            path = images / name
            if not path.is_file():
                raise DatasetError(f"expected image {path} (listed in {config.name})")
            out.append(ReidImage(str(path), int(labels[index - 1]), int(match.group(3))))
        return tuple(out)

    return ReidSplit(f"cuhk03_{subset}", subset_images("query_idx"), subset_images("gallery_idx"))


# ---------------------------------------------------------------------------------------------
# Market-1501


def _market_root(data_dir: Path, folders: tuple = ("bounding_box_test", "query")) -> Path:
    """The Market-1501 root holding ``folders``: DIR itself or its extracted ``Market-1501*`` child."""
    for candidate in (data_dir, data_dir / "Market-1501-v15.09.15", data_dir / "Market-1501"):
        if all((candidate / f).is_dir() for f in folders):
            return candidate
    expected = " and ".join(str(data_dir / f) for f in folders)
    raise DatasetError(f"expected Market-1501 folder(s) {expected} "
                       "(images named <pid:04d>_c<cam>s<seq>_<frame>_<box>.jpg)")


def _market_folder(folder: Path, keep_junk: bool) -> tuple:
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".jpg":
            continue  # Thumbs.db and the like
        match = _MARKET_NAME.match(path.name)
        if match is None:
            raise DatasetError(f"{path}: not a Market-1501 image name <pid:04d>_c<cam>s<seq>_<frame>_<box>.jpg")
        pid, cam = int(match.group(1)), int(match.group(2))
        if pid == -1 and not keep_junk:
            continue
        out.append(ReidImage(str(path), pid, cam))
    if not out:
        raise DatasetError(f"{folder}: no Market-1501 .jpg images found")
    return tuple(out)


def read_market1501(data_dir, keep_junk: bool = False) -> ReidSplit:
    """Market-1501 test split: ``query/`` and ``bounding_box_test/`` (junk pid -1 dropped unless ``keep_junk``)."""
    root = _market_root(Path(data_dir))
    return ReidSplit("market1501", _market_folder(root / "query", keep_junk=True),
                     _market_folder(root / "bounding_box_test", keep_junk))


def read_market1501_train(data_dir) -> tuple:
    """Market-1501 ``bounding_box_train/`` as ReidImage, sorted by name; junk (pid -1) and
    distractor (pid 0) boxes are not identities and are skipped."""
    root = _market_root(Path(data_dir), ("bounding_box_train",))
    images = tuple(im for im in _market_folder(root / "bounding_box_train", keep_junk=False) if im.pid > 0)
    if not images:
        raise DatasetError(f"{root / 'bounding_box_train'}: no Market-1501 training images (pid > 0) found")
    return images


def read_reid_dataset(data_dir, name: str, keep_junk: bool = False) -> ReidSplit:
    """``name`` in :data:`REID_DATASETS`."""
    if name == "cuhk03_labeled":
        return read_cuhk03(data_dir, "labeled")
    if name == "cuhk03_detected":
        return read_cuhk03(data_dir, "detected")
    if name == "market1501":
        return read_market1501(data_dir, keep_junk=keep_junk)
    raise ConfigError(f"unknown re-id dataset {name!r}; known: {', '.join(REID_DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Test-time preprocessing (spec §5.1)


def load_reid_image(path: str, size: Sequence[int] = REID_INPUT_SIZE, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB, PIL bilinear resize to ``size = (height, width)`` (skipped when already that size, no
    aspect-preserving crop), to [0, 1], per-channel normalisation. Returns ``[3, height, width]``."""
    pre = Preprocessing.parse({"input_size": list(size), "mean": list(mean), "std": list(std)}, "load_reid_image")
    return reid_eval_transform(pre)(load_rgb(path))
