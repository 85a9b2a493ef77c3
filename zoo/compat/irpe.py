"""The original ``irpe.py`` (microsoft/Cream iRPE, DeiT-with-iRPE and DETR-with-iRPE) on RelZoo's layers.

Change one line of code written for the original::

    from irpe import get_rpe_config, build_rpe            ->  from zoo.compat.irpe import get_rpe_config, build_rpe
    import irpe                                           ->  from zoo.compat import irpe
    from models.rpe_attention import RPEMultiheadAttention  ->  from zoo.compat.irpe import RPEMultiheadAttention

The names, arguments and return values are the original's: ``get_bucket_ids_2d`` returns
``(bucket_ids, num_buckets)`` and ``get_bucket_ids_2d_without_skip`` ``(bucket_ids, num_buckets, L)``;
configs are attribute dicts (the original's EasyDict); modules have the original's state_dict keys
(spec irpe §3). The numbers are the original's in every case the original runs, so there is no
``bug_compatible`` switch here: its bugs are crashes (method ``cross`` in ``RPEMultiheadAttention``,
``quant`` with the native index op) or a stale bucket cache that only broke a later reshape, and
those cases work here (spec irpe §8). The native ``rpe_ops`` are not needed: the index step runs
through :func:`zoo.ops.rpe_index` (RelZoo's native kernel where it builds, else ``torch.gather``).
"""
from __future__ import annotations

import torch

from zoo.layers.irpe import (METHOD, RPEMultiheadAttention, build_rpe, get_bucket_ids_2d,
                             get_bucket_ids_2d_without_skip, get_num_buckets, get_rpe_config, get_single_rpe_config,
                             iRPE, iRPE_Cross, piecewise_index)

__all__ = ["METHOD", "piecewise_index", "get_absolute_positions", "quantize_values", "get_num_buckets",
           "get_bucket_ids_2d_without_skip", "get_bucket_ids_2d", "iRPE", "iRPE_Cross", "get_single_rpe_config",
           "get_rpe_config", "build_rpe", "RPEMultiheadAttention"]


def get_absolute_positions(height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(height, width, 2) absolute (row, col) of every cell, 0-based, as the original's helper."""
    rows = torch.arange(height, dtype=dtype, device=device).view(height, 1).repeat(1, width)
    cols = torch.arange(width, dtype=dtype, device=device).view(1, width).repeat(height, 1)
    return torch.stack([rows, cols], 2)


@torch.no_grad()
def quantize_values(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Values -> ids 0..n-1 in sorted order of the distinct values, and n (the original's helper)."""
    unique, ids = torch.unique(values, sorted=True, return_inverse=True)
    return ids.to(values.dtype), unique.numel()
