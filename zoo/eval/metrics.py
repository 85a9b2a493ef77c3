"""Metrics shared by several protocols."""
from __future__ import annotations

from typing import Sequence

import torch

from zoo.errors import InputError


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent.

    Args:
        logits: (N, num_classes) scores.
        labels: (N,) integer class ids.
    Returns ``{'top1': ..., 'top5': ...}`` (one entry per k). A k larger than the number of
    classes counts every sample as correct, as the originals' ``accuracy`` helpers do.
    """
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise InputError(f"topk_accuracy expects logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise InputError("topk_accuracy got no samples")
    kmax = min(max(ks), logits.shape[1])
    # A stable order makes ties deterministic (torch.topk's order among equal scores is not specified).
    top = torch.argsort(logits, dim=1, descending=True, stable=True)[:, :kmax]
    hits = top.eq(labels.reshape(-1, 1))
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def per_class_top1(predicted: Sequence[int], labels: Sequence[int]) -> dict[int, dict[str, float]]:
    """``{label: {"top1": accuracy in percent, "samples": count}}`` for every label present."""
    counts: dict[int, list[int]] = {}
    for guess, label in zip(predicted, labels):
        hits = counts.setdefault(int(label), [0, 0])
        hits[0] += int(guess == label)
        hits[1] += 1
    return {label: {"top1": 100.0 * hit / total, "samples": float(total)} for label, (hit, total) in sorted(counts.items())}
