"""Figures of the attention maps (:mod:`zoo.viz.maps`), one function per view; each returns a matplotlib
``Figure`` (a notebook shows it; :func:`zoo.viz.save_figure` writes it).

``image`` arguments are (H, W, 3) float arrays in [0, 1], the input as the model saw it
(:func:`input_image` undoes the normalisation); maps of a feature grid are drawn over it with the
grid's stride (:func:`zoo.viz.maps.feature_stride`), so a cell covers the pixels it was computed from.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from zoo.errors import ConfigError
from zoo.viz.figure import new_figure
from zoo.viz.maps import (CrossMaps, Detections, IRPEMaps, Placement, RGAMaps, RPAMaps, RSAMaps, SASAMaps,
                          feature_stride)

__all__ = ["input_image", "input_frames", "resize_image", "plot_input", "plot_bucket_map", "plot_rpe_tables", "plot_cross_attention",
           "plot_spatial_attention", "plot_channel_attention", "plot_relational_kernels", "plot_affinity",
           "plot_local_attention"]

_HEAT = "inferno"
_SIGNED = "RdBu_r"


# =============================================================================================
# Inputs


def input_image(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) input back to an (H, W, 3) image in [0, 1]."""
    image = x.detach().float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def input_frames(clip: Tensor, mean: Sequence[float], std: Sequence[float]) -> list[np.ndarray]:
    """A normalised clip, (3T, H, W) (frames stacked along channels) or (3, T, H, W), as T images."""
    frames = clip.view(-1, 3, *clip.shape[-2:]) if clip.dim() == 3 else clip.transpose(0, 1)
    return [input_image(frame, mean, std) for frame in frames]


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """An (H, W, 3) image in [0, 1] resized (bilinear) to ``size`` (height, width)."""
    from PIL import Image

    pil = Image.fromarray((image * 255).round().astype(np.uint8)).resize((int(size[1]), int(size[0])), Image.BILINEAR)
    return np.asarray(pil, dtype=np.float32) / 255.0


def plot_input(image: np.ndarray, title: str = "input"):
    """The input as the model saw it (after resizing, cropping; normalisation undone)."""
    h, w = image.shape[:2]
    fig = new_figure(4.0, max(2.0, 4.0 * h / w))
    ax = fig.add_subplot()
    ax.imshow(image)
    ax.set_title(f"{title} ({h}x{w})", fontsize=9)
    ax.axis("off")
    return fig


# =============================================================================================
# Helpers


def _grid(count: int, columns: int):
    columns = max(1, min(columns, count))
    return math.ceil(count / columns), columns


def _axes(fig, rows: int, cols: int):
    axes = fig.subplots(rows, cols, squeeze=False)
    return axes


def _pixels(image: np.ndarray, grid: Sequence[int], placement: Optional[Placement]):
    """(origin y, origin x, cell height, cell width) in image pixels of a grid's cells."""
    ih, iw = image.shape[:2]
    if placement is None:
        return 0.0, 0.0, float(feature_stride(ih, grid[0])), float(feature_stride(iw, grid[1]))
    spy, spx = feature_stride(ih, placement.input_grid[0]), feature_stride(iw, placement.input_grid[1])
    return (placement.origin[0] * spy, placement.origin[1] * spx, placement.step[0] * spy, placement.step[1] * spx)


def _overlay(ax, image: Optional[np.ndarray], heat: Tensor, alpha: float = 0.6, cmap: str = _HEAT,
             placement: Optional[Placement] = None, **kwargs):
    """``heat`` (h, w) drawn over ``image``, each cell over the pixels it was computed from; returns the artist."""
    heat = heat.float().numpy()
    if image is None:
        return ax.imshow(heat, cmap=cmap, **kwargs)
    ih, iw = image.shape[:2]
    fh, fw = heat.shape
    y0, x0, cy, cx = _pixels(image, (fh, fw), placement)
    ax.imshow(image)
    artist = ax.imshow(heat, cmap=cmap, alpha=alpha, extent=(x0, x0 + fw * cx, y0 + fh * cy, y0),
                       interpolation="nearest", **kwargs)
    ax.set_xlim(0, iw)
    ax.set_ylim(ih, 0)
    return artist


def _mark(ax, image: Optional[np.ndarray], cell: Sequence[int], grid: Sequence[int],
          placement: Optional[Placement] = None, **style):
    """A marker at the centre of grid cell ``cell`` (in image pixels when there is an image)."""
    y, x = cell
    if image is not None:
        y0, x0, cy, cx = _pixels(image, grid, placement)
        y, x = y0 + (y + 0.5) * cy, x0 + (x + 0.5) * cx
    ax.plot([x], [y], marker=style.pop("marker", "*"), color=style.pop("color", "cyan"),
            markersize=style.pop("markersize", 12), markeredgecolor="black", **style)


def _clean(ax):
    ax.set_xticks([])
    ax.set_yticks([])


# =============================================================================================
# iRPE


def _bucket_colors(n: int):
    """``n`` colours in which consecutive bucket ids differ clearly (hues stepped by the golden ratio)."""
    from matplotlib.colors import ListedColormap, hsv_to_rgb

    golden = (math.sqrt(5) - 1) / 2
    return ListedColormap([hsv_to_rgb(((i * golden) % 1.0, 0.55 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2)))
                           for i in range(n)])


def plot_bucket_map(maps: IRPEMaps, title: str = ""):
    """Each table's bucket map for the query: the bucket id of every key position (one colour a bucket,
    written in the cell on small grids)."""
    from matplotlib.colors import BoundaryNorm
    from matplotlib.patches import Rectangle

    names = list(maps.bucket_maps)
    height, width = maps.feature_size
    fig = new_figure(max(3.5, 0.42 * width + 1.0) * len(names), max(3.0, 0.42 * height + 1.2))
    for ax, name in zip(_axes(fig, 1, len(names))[0], names):
        ids = maps.bucket_maps[name]
        n = maps.num_buckets[name]
        ax.imshow(ids.numpy(), cmap=_bucket_colors(n), norm=BoundaryNorm(np.arange(n + 1) - 0.5, n),
                  interpolation="nearest")
        if height * width <= 600:
            for (r, c), value in np.ndenumerate(ids.numpy()):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=7 if n < 100 else 6)
        qy, qx = maps.query
        ax.add_patch(Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
        shown = int(ids.unique().numel())
        ax.set_title(f"{name}: {maps.methods[name]}, {n} buckets ({shown} on this grid)", fontsize=9)
        _clean(ax)
    fig.suptitle(title or f"iRPE bucket ids of the keys for query {maps.query} (boxed), {height}x{width} grid",
                 fontsize=10)
    return fig


def plot_rpe_tables(layers: Mapping[str, IRPEMaps], title: str = "learned relative position tables"):
    """Every table of every layer, one panel per table head: its learned values on the bucket grid (bias),
    or the norm of each bucket's vector (contextual)."""
    panels = [(layer, name, head) for layer, maps in layers.items() for name in maps.tables
              for head in range(maps.tables[name].shape[0])]
    if not panels:
        raise ConfigError("plot_rpe_tables: no iRPE table")
    rows, cols = _grid(len(panels), 4)
    fig = new_figure(3.2 * cols, 3.0 * rows + 0.4)
    axes = _axes(fig, rows, cols)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (layer, name, head) in zip(axes.flat, panels):
        maps = layers[layer]
        table = maps.tables[name][head]
        artist = ax.imshow(table.numpy(), cmap=_SIGNED if maps.modes[name] == "bias" else "viridis",
                           interpolation="nearest")
        size = table.shape[1]
        beta = size // 2
        if table.shape[0] > 1:  # product: rows and columns are offset buckets -beta..beta
            ax.set_yticks([0, beta, size - 1], [f"{-beta}", "0", f"{beta}"])
            ax.set_ylabel("row offset bucket", fontsize=7)
        else:
            ax.set_yticks([])
        ax.set_xticks([0, beta, size - 1], [f"{-beta}", "0", f"{beta}"])
        what = "bias" if maps.modes[name] == "bias" else "|vector|"
        ax.set_title(f"{layer}\n{name} ({maps.methods[name]}) head {head}: {what}", fontsize=7)
        fig.colorbar(artist, ax=ax, shrink=0.7)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_cross_attention(image: Optional[np.ndarray], cross: CrossMaps, detections: Detections,
                         max_queries: int = 8, class_names: Optional[Sequence[str]] = None,
                         title: str = "decoder cross-attention"):
    """The ``max_queries`` best-scoring object queries: each one's attention over the image and its box."""
    from matplotlib.patches import Rectangle

    order = detections.scores.argsort(descending=True)[:max_queries].tolist()
    rows, cols = _grid(len(order), 4)
    aspect = 1.0 if image is None else image.shape[0] / image.shape[1]
    fig = new_figure(2.6 * cols, 2.6 * aspect * rows + 0.6)
    axes = _axes(fig, rows, cols)
    for ax in axes.flat[len(order):]:
        ax.axis("off")
    for ax, q in zip(axes.flat, order):
        _overlay(ax, image, cross.attention[q], alpha=0.65)
        x0, y0, x1, y1 = detections.boxes[q].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        label = int(detections.labels[q])
        name = class_names[label] if class_names and 0 <= label < len(class_names) else f"class {label}"
        ax.set_title(f"query {q}: {name} {float(detections.scores[q]):.2f}", fontsize=8)
        _clean(ax)
    fig.suptitle(title, fontsize=10)
    return fig


# =============================================================================================
# RGA


def plot_spatial_attention(image: Optional[np.ndarray], layers: Mapping[str, RGAMaps],
                           title: str = "RGA spatial attention"):
    """Each module's spatial attention (sigmoid, 0..1) over the input."""
    shown = {name: m for name, m in layers.items() if m.spatial is not None}
    if not shown:
        raise ConfigError("plot_spatial_attention: no module has a spatial branch")
    aspect = 1.0 if image is None else image.shape[0] / image.shape[1]
    fig = new_figure(2.2 * len(shown) + 0.8, 2.2 * aspect + 0.8)
    axes = _axes(fig, 1, len(shown))[0]
    for ax, (name, maps) in zip(axes, shown.items()):
        artist = _overlay(ax, image, maps.spatial, vmin=0, vmax=1)
        ax.set_title(f"{name}\n{maps.feature_size[0]}x{maps.feature_size[1]}", fontsize=8)
        _clean(ax)
    fig.colorbar(artist, ax=list(axes), shrink=0.8, label="attention")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_channel_attention(layers: Mapping[str, RGAMaps], title: str = "RGA channel attention"):
    """Each module's channel attention (sigmoid, 0..1) as a bar per channel."""
    shown = {name: m for name, m in layers.items() if m.channel is not None}
    if not shown:
        raise ConfigError("plot_channel_attention: no module has a channel branch")
    fig = new_figure(7.0, 1.8 * len(shown) + 0.6)
    for ax, (name, maps) in zip(_axes(fig, len(shown), 1)[:, 0], shown.items()):
        values = maps.channel.numpy()
        ax.bar(np.arange(len(values)), values, width=1.0, color="#3182bd")
        ax.set(xlim=(-0.5, len(values) - 0.5), ylim=(0, 1))
        ax.set_ylabel("attention", fontsize=7)
        ax.set_title(f"{name}: {len(values)} channels, mean {values.mean():.2f}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


# =============================================================================================
# RSA


def plot_relational_kernels(frames: Optional[Sequence[np.ndarray]], maps: RSAMaps, title: str = ""):
    """The relational kernel of one position across the frames of its neighbourhood: the top row shows
    the frames (the neighbourhood boxed, the position starred), the rows below each head's kernel on
    that frame (signed: red adds the value there, blue subtracts it)."""
    from matplotlib.patches import Rectangle

    nh, kt, kh, kw = maps.kernel.shape
    t, y, x = maps.position
    T, H, W = maps.feature_size
    rows = nh + (1 if frames is not None else 0)
    fig = new_figure(2.2 * kt + 0.8, 2.2 * rows + 0.6)
    axes = _axes(fig, rows, kt)
    limit = float(maps.kernel.abs().max()) or 1.0
    for dt in range(kt):
        frame_index = t + dt - kt // 2
        inside = 0 <= frame_index < T
        if frames is not None:
            ax = axes[0, dt]
            if inside:
                image = frames[frame_index]
                ax.imshow(image)
                sy, sx = feature_stride(image.shape[0], H), feature_stride(image.shape[1], W)
                ax.add_patch(Rectangle(((x - kw // 2) * sx, (y - kh // 2) * sy), kw * sx, kh * sy, fill=False,
                                       edgecolor="cyan", linewidth=1.5))
                if dt == kt // 2:
                    _mark(ax, image, (y, x), (H, W))
            ax.set_title(f"frame {frame_index}" + ("" if inside else " (outside: zeros)"), fontsize=8)
            _clean(ax)
        for head in range(nh):
            ax = axes[head + (1 if frames is not None else 0), dt]
            artist = ax.imshow(maps.kernel[head, dt].numpy(), cmap=_SIGNED, vmin=-limit, vmax=limit,
                               interpolation="nearest")
            ax.set_title(f"head {head}, frame offset {dt - kt // 2:+d}", fontsize=8)
            _clean(ax)
    fig.colorbar(artist, ax=list(axes[-nh:].flat), shrink=0.8, label="kernel weight")
    fig.suptitle(title or f"relational kernels ({maps.kernel_type}) of position (t {t}, y {y}, x {x})", fontsize=10)
    return fig


# =============================================================================================
# RPA


def plot_affinity(image: Optional[np.ndarray], maps: RPAMaps, title: str = ""):
    """Per head: the reference affinity q . A_k seen from the query, and the attention without and with it."""
    heads = maps.affinity.shape[0]
    aspect = 1.0 if image is None else image.shape[0] / image.shape[1]
    fig = new_figure(3.0 * 3 + 0.6, 3.0 * aspect * heads + 0.8)
    axes = _axes(fig, heads, 3)
    for head in range(heads):
        panels = [(maps.affinity[head], "reference affinity q . A_k", _SIGNED),
                  (maps.attention_without[head], "attention without relative term", _HEAT),
                  (maps.attention[head], "attention with relative term", _HEAT)]
        vmax = float(torch.maximum(maps.attention[head].max(), maps.attention_without[head].max()))
        for col, (heat, name, cmap) in enumerate(panels):
            ax = axes[head, col]
            limit = float(heat.abs().max()) or 1.0
            low, high = (-limit, limit) if cmap == _SIGNED else (0, vmax)
            artist = _overlay(ax, image, heat, alpha=0.7, cmap=cmap, placement=maps.placement, vmin=low, vmax=high)
            _mark(ax, image, maps.query, maps.feature_size, maps.placement)
            ax.set_title(f"head {head}: {name}", fontsize=8)
            _clean(ax)
            fig.colorbar(artist, ax=ax, shrink=0.7)
    fig.suptitle(title or f"RPA ({maps.mode}) for query {maps.query} of a "
                          f"{maps.feature_size[0]}x{maps.feature_size[1]} grid", fontsize=10)
    return fig


# =============================================================================================
# SASA


def _mosaic(panels: Sequence[Tensor]) -> np.ndarray:
    """Equal-sized 2-D panels side by side, one blank (NaN) column between them: one image, one axes."""
    rows = panels[0].shape[0]
    gap = np.full((rows, 1), np.nan)
    parts = []
    for i, panel in enumerate(panels):
        parts += ([gap] if i else []) + [panel.float().numpy()]
    return np.concatenate(parts, axis=1)


def plot_local_attention(image: Optional[np.ndarray], maps: SASAMaps, title: str = ""):
    """The k x k window of one pixel, head by head (left to right): the attention, the relative embedding's
    logit term and the attention without that term; on the left the window on the input."""
    from matplotlib.patches import Rectangle

    heads, k, _ = maps.attention.shape
    mosaic_width = 1.5 * (heads * (k + 1) - 1) / k  # inches, for rows 1.5 inches high
    fig = new_figure(3.0 + mosaic_width + 1.2, 6.6)
    grid = fig.add_gridspec(3, 2, width_ratios=[3.0, mosaic_width + 1.2])
    if image is not None:
        ax = fig.add_subplot(grid[:, 0])
        ax.imshow(image)
        H, W = maps.feature_size
        sy, sx = feature_stride(image.shape[0], H), feature_stride(image.shape[1], W)
        y, x = maps.pixel
        ax.add_patch(Rectangle(((x - k // 2) * sx, (y - k // 2) * sy), k * sx, k * sy, fill=False,
                               edgecolor="cyan", linewidth=1.5))
        _mark(ax, image, maps.pixel, maps.feature_size, markersize=8)
        ax.set_title("the window on the input", fontsize=8)
        _clean(ax)
    vmax = float(torch.maximum(maps.attention.max(), maps.attention_without.max()))
    limit = float(maps.relative.nan_to_num(0.0).abs().max()) or 1.0
    rows = [(maps.attention, "attention", _HEAT, 0.0, vmax),
            (maps.relative, "relative embedding's logit term q . r", _SIGNED, -limit, limit),
            (maps.attention_without, "attention without the relative term", _HEAT, 0.0, vmax)]
    centres = [h * (k + 1) + k // 2 for h in range(heads)]
    for row, (values, name, cmap, vmin, vmax_row) in enumerate(rows):
        ax = fig.add_subplot(grid[row, 1])
        artist = ax.imshow(_mosaic(list(values)), cmap=cmap, vmin=vmin, vmax=vmax_row, interpolation="nearest")
        ax.plot(centres, [k // 2] * heads, linestyle="none", marker="+", color="cyan", markersize=10)
        ax.set_xticks(centres, [f"head {h}" for h in range(heads)], fontsize=8)
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
        fig.colorbar(artist, ax=ax, shrink=0.8)
    fig.suptitle(title or f"local attention of pixel {maps.pixel} ({k}x{k} window)", fontsize=10)
    return fig
