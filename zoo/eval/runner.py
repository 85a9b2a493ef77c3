"""Run a protocol over a dataset on one process or many, and compare with the reported table.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the batches of a one-process run (consecutive runs of
``batch_size`` samples in dataset order) are dealt to the ranks whole: rank r evaluates batches
r, r + world, ... Each sample is evaluated exactly once, in the same batch as on one process (a
detector pads a batch to its largest image, so the batch a sample sits in changes its output),
and the predictions are gathered to rank 0 in dataset order: the metrics equal a one-process
run's at any batch size and any number of processes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from zoo._fs import atomic_write_text, sha256_file
from zoo.config import ModelConfig, ReportedMetric
from zoo.errors import ConfigError
from zoo.eval import DEFAULT_BATCH_SIZE
from zoo.eval.protocol import Protocol, get_protocol
from zoo.factory import create_model
from zoo.paths import env, progress_enabled
from zoo.registry import model_info, split_name
from zoo.viz.curves import write_eval_plots
from zoo.viz.figure import matplotlib_available

logger = logging.getLogger(__name__)


@dataclass
class MetricRow:
    metric: str
    reproduced: float
    reported: Optional[float] = None
    difference: Optional[float] = None
    source: str = ""
    not_comparable: str = ""  # why the reported number is not comparable (another split or sample count, --limit)


@dataclass
class EvalResult:
    model: str
    weights: Optional[str]
    protocol: str
    dataset: Optional[str]
    num_samples: int
    limited: bool
    rows: list = field(default_factory=list)  # MetricRow
    metrics: dict = field(default_factory=dict)
    split: Optional[str] = None
    warnings: list = field(default_factory=list)  # why the reported numbers are not comparable, one line each
    per_class: list = field(default_factory=list)  # {"class_id", "label", metric: value, ...} where the protocol has them
    batch_size: Optional[int] = None  # samples per batch (the batches are those of a one-process run)
    world_size: int = 1               # processes the batches were dealt to

    def table(self) -> str:
        """Markdown table: metric | reported | reproduced | difference | source (and one per class, when known)."""
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        split = f" {self.split}" if self.split else ""
        lines = [f"{self.model} ({self.weights or 'given weights'}) on {self.dataset or self.protocol}{split}: "
                 f"{self.num_samples} samples" + (" (--limit: a partial evaluation, not comparable)" if self.limited else "")]
        lines += [f"**not comparable**: {warning}" for warning in self.warnings]
        lines += ["", "| metric | reported | reproduced | difference | source |", "|---|---|---|---|---|"]
        for r in self.rows:
            difference = "not comparable" if r.not_comparable else fmt(r.difference)
            lines.append(f"| {r.metric} | {fmt(r.reported)} | {fmt(r.reproduced)} | {difference} | {r.source} |")
        if self.per_class:
            names = [key for key in self.per_class[0] if key not in ("class_id", "label")]
            lines += ["", "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [f"| {row['class_id']} {row['label']} | " + " | ".join(fmt(row[n]) for n in names) + " |"
                      for row in self.per_class]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**asdict(self), "table": self.table()}


_we_initialised = False


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun.

    The backend is ``$RELZOO_DIST_BACKEND``, else nccl with CUDA and gloo without.
    """
    global _we_initialised
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        default = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=env("RELZOO_DIST_BACKEND") or default)
        _we_initialised = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finish_distributed() -> None:
    """Tear down a process group this module started (a process exiting with one alive aborts)."""
    global _we_initialised
    if _we_initialised and dist.is_initialized():
        dist.destroy_process_group()
    _we_initialised = False


def _compare(metrics: dict[str, float], reported: list[ReportedMetric], dataset: Optional[str], *,
             split: Optional[str] = None, num_samples: Optional[int] = None, limited: bool = False) -> list[MetricRow]:
    """Rows of reproduced vs reported; a row whose reported number was measured on another split or
    sample count (or a --limit run) says so in ``not_comparable``."""
    rows = []
    for metric, value in metrics.items():
        match = next((r for r in reported if r.metric == metric and (dataset is None or r.dataset == dataset)), None)
        if match is None:
            rows.append(MetricRow(metric, value))
            continue
        source = match.source + ("" if match.verified else " (unverified)")
        reasons = []
        if match.split is not None and split is not None and match.split != split:
            reasons.append(f"reported on split '{match.split}', evaluated on '{split}'")
        if match.num_samples is not None and num_samples is not None and match.num_samples != num_samples:
            reasons.append(f"reported on {match.num_samples} samples, evaluated on {num_samples}")
        if limited:
            reasons.append("a --limit run")
        rows.append(MetricRow(metric, value, match.value, value - match.value, source, "; ".join(reasons)))
    return rows


def _per_class_rows(protocol: Protocol, label_names: Optional[tuple[str, ...]]) -> list[dict]:
    """The protocol's per-class numbers with each class's name: the weights' label names, else the dataset's own."""
    dataset_names = protocol.class_names() if protocol.per_class_metrics else {}
    rows = []
    for class_id, values in sorted(protocol.per_class_metrics.items()):
        if label_names is not None and 0 <= class_id < len(label_names):
            label = label_names[class_id]
        else:
            label = dataset_names.get(class_id, f"class {class_id}")
        rows.append({"class_id": class_id, "label": label, **values})
    return rows


def shard_batches(num_samples: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """The sample indices of the batches rank ``rank`` of ``world`` evaluates.

    The batches are those of a one-process run, ``[0, b), [b, 2b), ...`` (the last one shorter),
    dealt round-robin: rank r gets batches r, r + world, ... (none when there are fewer batches
    than ranks).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    starts = range(0, num_samples, batch_size)
    return [list(range(s, min(s + batch_size, num_samples))) for s in starts][rank::world]


def run_protocol(model: nn.Module, protocol: Protocol, *, batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0,
                 device: Union[str, torch.device] = "cpu", progress: bool = True,
                 dataset=None) -> tuple[dict[str, float], int]:
    """Evaluate ``model`` with ``protocol`` on this process's batches (:func:`shard_batches`); returns
    (metrics, num_samples) on rank 0 and ({}, num_samples) elsewhere. ``dataset``: ``protocol.dataset()``
    if already read."""
    rank, world = _distributed()
    device = torch.device(device)
    dataset = protocol.dataset() if dataset is None else dataset
    batches = shard_batches(len(dataset), batch_size, rank, world)
    indices = [i for batch in batches for i in batch]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=protocol.collate)
    model = model.to(device).eval()
    mine: list = []
    bar = None
    if progress and rank == 0 and progress_enabled():  # a terminal, and RELZOO_NO_PROGRESS unset
        bar = tqdm(total=len(indices), unit="sample", desc=f"eval {protocol.name}", dynamic_ncols=True)
    with torch.inference_mode():
        for batch in loader:
            predictions = protocol.predict(model, batch, device)
            mine.extend(predictions)
            if bar is not None:
                bar.update(len(predictions))
    if bar is not None:
        bar.close()
    if len(mine) != len(indices):
        raise RuntimeError(f"protocol '{protocol.name}' returned {len(mine)} predictions for {len(indices)} samples")

    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(list(zip(indices, mine)), gathered, dst=0)
        dist.barrier()
        if rank != 0:
            return {}, len(dataset)
        ordered = sorted((pair for shard in gathered for pair in shard), key=lambda pair: pair[0])
        predictions = [p for _, p in ordered]
    else:
        predictions = mine
    return protocol.compute(predictions), len(dataset)


def _command(name: str, data_dir: Path, weights: Optional[str], batch_size: int, limit: Optional[int],
             options: Optional[dict]) -> str:
    """The ``python -m zoo eval`` command line that reproduces a result (recorded in its JSON)."""
    parts = ["python", "-m", "zoo", "eval", name, "--data", str(data_dir)]
    if weights is not None:
        parts += ["--weights", str(weights)]
    if batch_size != DEFAULT_BATCH_SIZE:
        parts += ["--batch-size", str(batch_size)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    if options:
        parts += ["--options", json.dumps(options, sort_keys=True)]
    return shlex.join(parts)


def _write_plots(curves: dict, folder: Path) -> dict:
    """The protocol's curves drawn beside the results JSON: ``{curve: {"file", "sha256"}}`` (the sha256 lets
    ``zoo site`` tell a plot that a later evaluation into the same folder replaced)."""
    if not curves:
        return {}
    if not matplotlib_available():
        warnings.warn(f"matplotlib is not installed, so zoo eval draws no {', '.join(sorted(curves))} plot: "
                      "pip install 'relzoo[viz]' (or pass --no-plots)", stacklevel=3)
        return {}
    return {curve: {"file": file, "sha256": sha256_file(folder / file)}
            for curve, file in write_eval_plots(curves, folder).items()}


def evaluate(name: str, data_dir: Union[str, Path], *, weights: Optional[str] = None, model: Optional[nn.Module] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0, device: str = "cpu", limit: Optional[int] = None,
             out: Union[str, Path, None] = None, options: Optional[dict] = None,
             progress: bool = True, plots: bool = True) -> Optional[EvalResult]:
    """``python -m zoo eval``: build the model and protocol from the config, run, compare.

    Args:
        name: ``model`` or ``model.tag``.
        data_dir: dataset root in the original on-disk format.
        weights: weights source overriding the tag (tag, path, URL, ``hf://``).
        model: an already built model to evaluate instead of building ``name`` (tests, training loops).
        out: write the result as JSON there, and the markdown table beside it (``.md``); the JSON also
            holds the protocol's curves and the command line that reproduces the result.
        options: overrides of the config's ``eval`` options.
        plots: with ``out``, draw the protocol's curves beside the JSON (``pr_curve.png`` for COCO
            protocols, ``cmc.png`` for re-id; they need matplotlib, the ``viz`` extra). The names are
            fixed, so give each evaluation its own folder to keep its plots.
    Returns the result on rank 0, None on other ranks.
    """
    base, tag = split_name(name)
    cfg: ModelConfig = model_info(base)
    shard_batches(0, batch_size, 0, 1)  # a bad batch size fails here, before the dataset is read
    eval_options = dict(cfg.eval)
    protocol_name = eval_options.pop("protocol", None)
    if protocol_name is None:
        raise ConfigError(f"model '{base}' has no evaluation protocol in its config")
    eval_options.update(options or {})
    protocol = get_protocol(protocol_name)(Path(data_dir), cfg, eval_options, limit)
    dataset = protocol.dataset()  # a missing or malformed dataset fails here, before any download
    if model is None:
        model = create_model(name, pretrained=weights is None, weights=weights)

    start = time.perf_counter()
    try:
        metrics, num_samples = run_protocol(model, protocol, batch_size=batch_size, workers=workers, device=device,
                                            progress=progress, dataset=dataset)
        rank, world = _distributed()
    finally:
        finish_distributed()
    if rank != 0:
        return None
    shown = min(num_samples, limit) if limit else num_samples
    rows = _compare(metrics, cfg.reported_for(tag), protocol.dataset_name, split=protocol.split, num_samples=shown,
                    limited=limit is not None)
    warnings = sorted({row.not_comparable for row in rows if row.not_comparable})
    label_names = getattr(getattr(model, "pretrained_cfg", None), "label_names", None)
    result = EvalResult(model=base, weights=weights or tag or cfg.default_weights, protocol=protocol_name,
                        dataset=protocol.dataset_name, num_samples=shown, limited=limit is not None,
                        rows=rows, metrics=metrics, split=protocol.split, warnings=warnings,
                        per_class=_per_class_rows(protocol, label_names), batch_size=batch_size, world_size=world)
    for warning in warnings:
        logger.warning("not comparable with the reported numbers: %s", warning)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"non-finite metric from protocol '{protocol_name}': {metrics}")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        drawn = _write_plots(protocol.curves, out.parent) if plots else {}
        record = {**result.to_json(), "seconds": time.perf_counter() - start, "curves": protocol.curves,
                  "plots": drawn, "command": _command(name, Path(data_dir), weights, batch_size, limit, options)}
        atomic_write_text(out, json.dumps(record, indent=2))
        atomic_write_text(out.with_suffix(".md"), result.table() + "\n")
    return result
