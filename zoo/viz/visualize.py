"""``python -m zoo visualize NAME --image IMG (or --video DIR) --out DIR``: every figure of a model's
attention for one input, as PNGs and an ``index.html`` that shows them (and ``visualize.json``, the
list of figures, which ``zoo site`` reads).

The input is preprocessed as the model's evaluation protocol does it (:mod:`zoo.data.transforms`:
COCO detection resize, re-id resize, classification centre crop, or the video frames of a folder
sampled as the Something-Something protocol does), :func:`zoo.viz.attention_maps` records the maps,
and one figure per view is drawn (:mod:`zoo.viz.plots`):

- iRPE: ``bucket_map.png`` (buckets of the query, the model's method), ``rpe_tables.png`` (each head's
  learned table); DETR also ``cross_attention.png`` (each object query's attention and its box);
- RGA: ``spatial_attention.png`` (each module over the image), ``channel_attention.png`` (bars);
- RSA: ``relational_kernels_<layer>.png`` (the kernels of the chosen position across frames);
- RPA: ``affinity_<layer>.png`` (reference affinity of the query, attention without and with it);
- SASA: ``local_attention_<layer>.png`` (the window of the chosen pixel per head, the relative term).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from zoo._fs import replace_dir
from zoo.config import ModelConfig
from zoo.data.coco import COCO_CLASSES
from zoo.data.imagefolder import IMAGE_EXTENSIONS, load_rgb
from zoo.data.ssv import segment_indices
from zoo.data.transforms import (DEFAULT_NUM_FRAMES, IMAGENET_MEAN, IMAGENET_STD, VideoEvalTransform,
                                 classification_eval_transform, detection_eval_transform, reid_eval_transform)
from zoo.errors import DatasetError, ZooError
from zoo.registry import model_info, split_name
from zoo.viz.figure import save_figure
from zoo.viz.html import escape, figure, page
from zoo.viz.maps import AttentionMaps, CrossMaps, IRPEMaps, RGAMaps, RPAMaps, RSAMaps, SASAMaps, attention_maps
from zoo.viz.plots import (input_frames, input_image, plot_affinity, resize_image, plot_bucket_map, plot_channel_attention,
                           plot_cross_attention, plot_input, plot_local_attention, plot_relational_kernels,
                           plot_rpe_tables, plot_spatial_attention)

__all__ = ["visualize", "Figure", "MANIFEST", "read_manifest", "figures_of", "prepare_input"]

#: The list of figures a visualisation folder holds (read by ``zoo site``).
MANIFEST = "visualize.json"


@dataclass
class Figure:
    """One figure of a visualisation: its file, title, caption and the family whose mechanism it shows."""

    file: str
    title: str
    caption: str
    family: str
    figure: object = None  # the matplotlib Figure (not stored in the manifest)


def _is_video(cfg: ModelConfig) -> bool:
    return cfg.eval.get("protocol") == "ssv" or cfg.preprocessing.num_frames is not None


def prepare_input(cfg: ModelConfig, *, image: Union[str, Path, None] = None, video: Union[str, Path, None] = None):
    """The model's input for an image file or a folder of video frames, as its evaluation protocol
    preprocesses it: ``(x without batch dimension, [displayed image or frames (H, W, 3) in [0, 1]])``."""
    pre = cfg.preprocessing
    mean, std = tuple(pre.mean or IMAGENET_MEAN), tuple(pre.std or IMAGENET_STD)
    if _is_video(cfg):
        if video is None:
            raise ZooError(f"model '{cfg.name}' takes a video: give --video DIR, a folder of its frames (img_00001.jpg, ...)")
        folder = Path(video)
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        if not frames:
            raise DatasetError(f"expected a folder of video frames at {folder} (img_00001.jpg, img_00002.jpg, ...)")
        transform = VideoEvalTransform(pre)
        indices = segment_indices(len(frames), pre.num_frames or DEFAULT_NUM_FRAMES)  # 1-based, as the protocol
        x = transform.clip([transform.frame(load_rgb(frames[i - 1])) for i in indices])
        return x, input_frames(x, mean, std)
    if image is None:
        raise ZooError(f"model '{cfg.name}' takes an image: give --image IMG")
    if not Path(image).is_file():
        raise FileNotFoundError(f"image not found: {image}")
    protocol = cfg.eval.get("protocol")
    if protocol == "coco":
        transform = detection_eval_transform(pre)
    elif protocol == "reid":
        transform = reid_eval_transform(pre)
    else:
        transform = classification_eval_transform(pre)
    x = transform(load_rgb(image))
    return x, [input_image(x, mean, std)]


def _file(prefix: str, layer: str) -> str:
    return f"{prefix}_{layer.replace('.', '_')}.png"


def _class_names(cfg: ModelConfig) -> Optional[Sequence[str]]:
    names = getattr(cfg, "label_names", None)  # configs may name their classes
    if names:
        return list(names)
    return COCO_CLASSES if cfg.kwargs.get("num_classes", 91) == 91 else None


def figures_of(maps: AttentionMaps, cfg: ModelConfig, shown: Sequence) -> list[Figure]:
    """Every figure of ``maps`` (see the module docstring); ``shown``: the input image, or the frames."""
    image = shown[0] if len(shown) == 1 else None
    frames = shown if len(shown) > 1 else None
    if image is not None and maps.network_input_size != maps.input_size:  # drawn at the size the layers saw
        image = resize_image(image, maps.network_input_size)
    out: list[Figure] = []
    irpe = maps.of(IRPEMaps)
    if irpe:
        first_name, first = next(iter(irpe.items()))
        out.append(Figure("bucket_map.png", "iRPE bucket map",
                          f"Bucket id of every key position for the query {first.query} (star) on the "
                          f"{first.feature_size[0]}x{first.feature_size[1]} grid of {first_name}, method "
                          f"{', '.join(sorted(set(first.methods.values())))}: keys of one colour share one learned "
                          "table entry.", "irpe", plot_bucket_map(first)))
        out.append(Figure("rpe_tables.png", "iRPE learned tables",
                          "Each table head's learned entries on the bucket grid (rows and columns: the row and "
                          "column offset buckets for the product method): the bias itself, or the length of "
                          "the contextual vector that a query or key is multiplied with.", "irpe",
                          plot_rpe_tables(irpe)))
    cross = maps.of(CrossMaps)
    if cross and maps.detections is not None:
        name, last = list(cross.items())[-1]
        out.append(Figure("cross_attention.png", "DETR decoder cross-attention",
                          f"The best-scoring object queries: each one's cross-attention over the image in the last "
                          f"decoder layer ({name}, averaged over heads) and its predicted box.", "irpe",
                          plot_cross_attention(image, last, maps.detections, class_names=_class_names(cfg))))
    rga = maps.of(RGAMaps)
    if any(m.spatial is not None for m in rga.values()):
        out.append(Figure("spatial_attention.png", "RGA spatial attention",
                          "The spatial attention of each RGA module (after each ResNet stage) over the input: "
                          "the weight each position's features are multiplied with.", "rga",
                          plot_spatial_attention(image, rga)))
    if any(m.channel is not None for m in rga.values()):
        out.append(Figure("channel_attention.png", "RGA channel attention",
                          "The channel attention of each RGA module: the weight of each channel.", "rga",
                          plot_channel_attention(rga)))
    for name, m in maps.of(RSAMaps).items():
        out.append(Figure(_file("relational_kernels", name), f"RSA relational kernels: {name}",
                          f"The relational kernel ({m.kernel_type}) that each head applies at position "
                          f"(t {m.position[0]}, y {m.position[1]}, x {m.position[2]}) to the values of its "
                          f"neighbourhood, one column per frame of the neighbourhood.", "rsa",
                          plot_relational_kernels(frames, m, title=f"{name}: relational kernels")))
    for name, m in maps.of(RPAMaps).items():
        out.append(Figure(_file("affinity", name), f"RPA reference affinity: {name}",
                          f"For the query {m.query} (star) of the {m.feature_size[0]}x{m.feature_size[1]} grid: "
                          f"the reference affinity ({m.mode}) it adds to the logit of each key, and its "
                          "attention without and with that term.", "rpa",
                          plot_affinity(image, m, title=f"{name}: relative {m.mode}")))
    for name, m in maps.of(SASAMaps).items():
        out.append(Figure(_file("local_attention", name), f"SASA local attention: {name}",
                          f"The {m.attention.shape[-1]}x{m.attention.shape[-1]} window of pixel {m.pixel} "
                          f"of the {m.feature_size[0]}x{m.feature_size[1]} grid, per head: the attention, the "
                          "relative embedding's logit term and the attention without it.", "sasa",
                          plot_local_attention(image, m, title=f"{name}: local attention")))
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ZooError(f"output {out} exists and is not an earlier zoo visualize folder; choose another --out")


def visualize(model: nn.Module, name: Union[str, ModelConfig], out: Union[str, os.PathLike], *,
              image: Union[str, Path, None] = None, video: Union[str, Path, None] = None,
              point: Sequence[float] = (0.5, 0.5), frame: Optional[int] = None, weights: Optional[str] = None) -> Path:
    """Draw every figure of ``model``'s attention for one input into the folder ``out``; returns its index.html.

    Args:
        model: the built model (``zoo.create_model(name, pretrained=True)``).
        name: its registry name (``name.tag`` accepted) or config: the preprocessing and labels come from it.
        out: the folder (new, empty or an earlier visualisation, which is replaced as a whole).
        image / video: an image file, or a folder of frames for a video model.
        point: (row, col) fractions of the input: the query, position or pixel shown (default the centre).
        frame: RSA's frame (default the middle one).
        weights: what the weights were, for the page (e.g. the tag or the path).
    """
    cfg = name if isinstance(name, ModelConfig) else model_info(split_name(name)[0])
    out = Path(out)
    _check_out(out)
    x, shown = prepare_input(cfg, image=image, video=video)
    maps = attention_maps(model, x, point=point, frame=frame)
    middle = len(shown) // 2 if frame is None else min(max(int(frame), 0), len(shown) - 1)
    figures = [Figure("input.png", "input", "The input as the model sees it (resized and cropped as its "
                      "evaluation does; the normalisation undone)" + (f", frame {middle} of {len(shown)}"
                                                                       if len(shown) > 1 else "") + ".",
                      cfg.family, plot_input(shown[middle]))] + figures_of(maps, cfg, shown)
    manifest = {"model": cfg.name, "family": cfg.family, "weights": weights, "input": str(video or image),
                "point": list(point), "frame": frame,
                "figures": [{k: v for k, v in vars(f).items() if k != "figure"} for f in figures]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for f in figures:
            save_figure(f.figure, tmp / f.file)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / "index.html").write_text(_index_html(manifest), encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def _index_html(manifest: dict) -> str:
    weights = f" ({escape(str(manifest['weights']))})" if manifest.get("weights") else ""
    body = [f"<h1><code>{escape(manifest['model'])}</code>{weights}</h1>",
            f"<p class=\"muted\">{escape(manifest['family'])} family; input <code>{escape(manifest['input'])}</code>; "
            f"point {escape(str(manifest['point']))} (row, col fractions)</p>"]
    body += [figure(f["file"], f["title"], f["caption"]) for f in manifest["figures"]]
    return page(f"{manifest['model']}: attention", "\n".join(body))


def read_manifest(folder: Path) -> Optional[dict]:
    """The ``visualize.json`` of a visualisation folder, or None if it has none or it is not one."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not isinstance(data.get("figures"), list):
        return None
    return data
