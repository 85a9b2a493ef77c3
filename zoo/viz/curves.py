"""Curves of training and evaluation: the loss per epoch, validation metrics per epoch, COCO's
precision-recall per IoU threshold and re-id's cumulative matching characteristic.

``zoo train`` draws :func:`plot_loss` (``loss.png``) and, when it validates, :func:`plot_metrics`
(``metrics.png``) beside the weights; ``zoo eval`` draws the curves its protocol computed
(``Protocol.curves``) beside its JSON through :func:`write_eval_plots`: ``pr_curve.png`` for COCO
protocols, ``cmc.png`` for re-id. The curve data are JSON-ready dicts (they are also stored in the
results JSON), described at each function.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from zoo.errors import InputError
from zoo.viz.figure import new_figure, save_figure

__all__ = ["plot_loss", "plot_metrics", "plot_pr_curve", "plot_cmc", "EVAL_PLOTS", "write_eval_plots",
           "average_precision_per_iou"]


def plot_loss(loss_per_epoch: Sequence[float], loss_per_step: Optional[Sequence[float]] = None,
              title: str = "training loss"):
    """The training loss: the mean of each epoch (a point at the end of the epoch) and, if given, every
    step's loss behind it. Returns the Figure."""
    if not loss_per_epoch:
        raise InputError("plot_loss needs the loss of at least one epoch")
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    epochs = len(loss_per_epoch)
    if loss_per_step:
        steps_per_epoch = len(loss_per_step) / epochs
        ax.plot([(i + 1) / steps_per_epoch for i in range(len(loss_per_step))], loss_per_step, color="#9ecae1",
                linewidth=0.8, label="step")
    ax.plot(range(1, epochs + 1), loss_per_epoch, color="#08519c", marker="o" if epochs <= 60 else None,
            markersize=3, linewidth=1.8, label="epoch mean")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_metrics(metrics_per_epoch: Mapping[str, Sequence[float]], title: str = "validation"):
    """Validation metrics after every epoch, one line per metric (``{"AP": [...], "AP50": [...]}``)."""
    if not metrics_per_epoch or not any(metrics_per_epoch.values()):
        raise InputError("plot_metrics needs at least one metric with at least one epoch")
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for name, values in metrics_per_epoch.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set(xlabel="epoch", ylabel="metric (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def average_precision_per_iou(pr_curve: Mapping) -> list[Optional[float]]:
    """AP (percent) at each IoU threshold of a :func:`plot_pr_curve` data dict: the mean precision over the
    101 recall points, as COCO computes it (None where no category has ground truth)."""
    out = []
    for row in pr_curve["precision"]:
        out.append(None if any(p is None for p in row) else 100.0 * sum(row) / len(row))
    return out


def plot_pr_curve(pr_curve: Mapping, title: str = "precision-recall"):
    """COCO precision-recall, one curve per IoU threshold.

    ``pr_curve``: ``{"recall": [R], "iou_thresholds": [T], "precision": [T][R] (None where undefined),
    "area": "all", "max_dets": 100}``: COCOeval's interpolated precision at each recall threshold,
    averaged over the categories with ground truth (what ``CocoProtocol`` stores). The legend gives each
    curve's AP, the mean of its precision.
    """
    recall, thresholds, precision = pr_curve["recall"], pr_curve["iou_thresholds"], pr_curve["precision"]
    if len(precision) != len(thresholds) or any(len(row) != len(recall) for row in precision):
        raise InputError(f"pr_curve: precision must be [{len(thresholds)} thresholds][{len(recall)} recall points]")
    from matplotlib import colormaps

    fig = new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for i, (iou, row, ap) in enumerate(zip(thresholds, precision, average_precision_per_iou(pr_curve))):
        if ap is None:
            continue
        ax.plot(recall, row, color=cmap(i / max(1, len(thresholds) - 1)), linewidth=1.4,
                label=f"IoU {iou:.2f}: AP {ap:.1f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{title} (area {pr_curve.get('area', 'all')}, {pr_curve.get('max_dets', 100)} detections)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def plot_cmc(cmc: Mapping, max_rank: int = 50, title: str = "cumulative matching characteristic"):
    """Re-id CMC: the fraction of queries (percent) whose first true match is within rank k.

    ``cmc``: ``{"ranks": [1..K], "cmc": [K] percent, "mAP": percent}`` (what ``ReidProtocol`` stores);
    ranks 1 to ``max_rank`` are drawn, rank-1 and mAP written in the title.
    """
    ranks, values = list(cmc["ranks"]), list(cmc["cmc"])
    if not ranks or len(ranks) != len(values):
        raise InputError(f"cmc: ranks and cmc must be equally long and non-empty, got {len(ranks)} and {len(values)}")
    shown = [(r, v) for r, v in zip(ranks, values) if r <= max_rank]
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    ax.plot([r for r, _ in shown], [v for _, v in shown], color="#a63603", marker="o", markersize=3)
    for k in (1, 5, 10):
        if k <= len(values):
            ax.annotate(f"rank-{k} {values[k - 1]:.1f}", (k, values[k - 1]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    m_ap = cmc.get("mAP")
    ax.set(xlabel="rank", ylabel="matching rate (%)", ylim=(0, 101),
           title=f"{title}: rank-1 {values[0]:.1f}" + ("" if m_ap is None else f", mAP {m_ap:.1f}"))
    ax.grid(alpha=0.3)
    return fig


#: ``Protocol.curves`` key -> (file written beside the results JSON, the function drawing it).
EVAL_PLOTS = {"pr_curve": ("pr_curve.png", plot_pr_curve), "cmc": ("cmc.png", plot_cmc)}


def write_eval_plots(curves: Mapping[str, Mapping], folder: Path) -> dict[str, str]:
    """Draw every curve of ``curves`` that has a plot (:data:`EVAL_PLOTS`) into ``folder``;
    returns ``{curve name: file name}`` of what was written."""
    written = {}
    for name, data in curves.items():
        if name in EVAL_PLOTS:
            filename, plot = EVAL_PLOTS[name]
            save_figure(plot(data), Path(folder) / filename)
            written[name] = filename
    return written
