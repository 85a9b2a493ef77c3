"""Input checks at the top of every model's ``forward``: what the model takes, said before any layer runs.

:func:`check_batch` looks only at what torch.compile and torch.export know while they trace: the rank,
the sizes and the dtype (no value is read, nothing calls ``.item()``), so a check costs nothing in a
compiled graph. A wrong input is an :class:`~zoo.errors.InputError` (also a ``ValueError``) naming the
layout the model takes.

Models do not cast their input. A uint8 image or a float64 batch is the caller's to convert
(``x.float() / 255``, ``x.to(torch.float32)``), because only the caller knows what range its values are
in; under ``torch.autocast`` any floating dtype is accepted. NaN and inf are looked for only where
predictions are made (:func:`check_finite`, the detectors' predict path): that check reads values.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from zoo.errors import InputError

__all__ = ["check_batch", "check_dtype", "check_finite", "weight_dtype"]


def weight_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of ``module``'s first floating parameter (or buffer): the dtype its input must have."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def check_dtype(x: torch.Tensor, model: str, dtype: Optional[torch.dtype]) -> None:
    """``x`` is floating point, of ``dtype`` (the model's weights'; any floating dtype under autocast)."""
    if not x.is_floating_point():
        raise InputError(f"{model} takes floating-point input, got {x.dtype}; convert it yourself (e.g. "
                         f"x.float() / 255 for uint8 images): models do not cast their input")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise InputError(f"{model} has {dtype} weights but got a {x.dtype} input; cast one of them "
                         f"(x.to({dtype}) or model.to({x.dtype})): models do not cast their input")


def check_batch(x, *, model: str, layout: str, rank: Union[int, Sequence[int]], channels: Optional[int],
                dtype: Optional[torch.dtype], min_size: int = 1, channel_dim: int = 1,
                size: Optional[tuple[int, int]] = None) -> None:
    """Check a batch ``x`` before a model runs on it.

    Args:
        model: the model's name in messages.
        layout: what it takes: a shape, e.g. ``"(B, 3, H, W)"``, or words (``"a list of (3, H, W) images"``).
        rank: the number of dimensions (or the allowed ones).
        channels: ``x.shape[channel_dim]`` must equal it (None: any).
        dtype: the model's weights' dtype (:func:`weight_dtype`; None: any floating dtype).
        min_size: the smallest height and width (the last two dimensions) it takes, e.g. its total stride.
        size: the one (height, width) it takes, for models built for one input size.
    """
    takes = f"input of shape {layout}" if layout.startswith("(") else layout
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{model} takes {takes}, got a {type(x).__name__}")
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if x.dim() not in ranks:
        raise InputError(f"{model} takes {takes}, got a tensor of shape {tuple(x.shape)}")
    if channels is not None and x.shape[channel_dim] != channels:
        raise InputError(f"{model} takes {channels} input channels ({takes}), got {x.shape[channel_dim]} "
                         f"in a tensor of shape {tuple(x.shape)}")
    check_dtype(x, model, dtype)
    height, width = x.shape[-2], x.shape[-1]
    if size is not None and (height, width) != tuple(size):
        raise InputError(f"{model} takes {takes} (it was built for {size[0]}x{size[1]} inputs), got a tensor of "
                         f"shape {tuple(x.shape)}")
    if height < min_size or width < min_size:
        raise InputError(f"{model} takes inputs of at least {min_size}x{min_size} pixels (its total stride), "
                         f"got {height}x{width}")


def check_finite(images: Union[torch.Tensor, Sequence[torch.Tensor]], model: str) -> None:
    """Every value of ``images`` is finite: NaN or inf input would come back as no detections at all.

    Reads the values (one reduction per image), so it belongs on the predict path, not in ``forward``."""
    for i, image in enumerate([images] if isinstance(images, torch.Tensor) else images):
        if isinstance(image, torch.Tensor) and image.is_floating_point() and not bool(torch.isfinite(image).all()):
            where = "the input" if isinstance(images, torch.Tensor) else f"image {i}"
            raise InputError(f"{model}: {where} holds NaN or inf values; a detector cannot predict on them")
