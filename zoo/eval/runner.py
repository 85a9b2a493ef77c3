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
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from zoo._fs import atomic_write_text
from zoo.config import ModelConfig, ReportedMetric
from zoo.eval import DEFAULT_BATCH_SIZE
from zoo.eval.protocol import Protocol, get_protocol
from zoo.factory import create_model
from zoo.paths import env, progress_enabled
from zoo.registry import model_info, split_name


@dataclass
class MetricRow:
    metric: str
    reproduced: float
    reported: Optional[float] = None
    difference: Optional[float] = None
    source: str = ""


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
    batch_size: Optional[int] = None  # samples per batch (the batches are those of a one-process run)
    world_size: int = 1               # processes the batches were dealt to

    def table(self) -> str:
        """Markdown table: metric | reported | reproduced | difference | source."""
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        lines = [f"{self.model} ({self.weights or 'given weights'}) on {self.dataset or self.protocol}: "
                 f"{self.num_samples} samples" + (" (--limit: a partial evaluation, not comparable)" if self.limited else ""),
                 "", "| metric | reported | reproduced | difference | source |", "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.metric} | {fmt(r.reported)} | {fmt(r.reproduced)} | {fmt(r.difference)} | {r.source} |")
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


def _compare(metrics: dict[str, float], reported: list[ReportedMetric], dataset: Optional[str]) -> list[MetricRow]:
    rows = []
    for metric, value in metrics.items():
        match = next((r for r in reported if r.metric == metric and (dataset is None or r.dataset == dataset)), None)
        if match is None:
            rows.append(MetricRow(metric, value))
        else:
            source = match.source + ("" if match.verified else " (unverified)")
            rows.append(MetricRow(metric, value, match.value, value - match.value, source))
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


def evaluate(name: str, data_dir: Union[str, Path], *, weights: Optional[str] = None, model: Optional[nn.Module] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0, device: str = "cpu", limit: Optional[int] = None,
             out: Union[str, Path, None] = None, options: Optional[dict] = None,
             progress: bool = True) -> Optional[EvalResult]:
    """``python -m zoo eval``: build the model and protocol from the config, run, compare.

    Args:
        name: ``model`` or ``model.tag``.
        data_dir: dataset root in the original on-disk format.
        weights: weights source overriding the tag (tag, path, URL, ``hf://``).
        model: an already built model to evaluate instead of building ``name`` (tests, training loops).
        out: write the result as JSON there, and the markdown table beside it (``.md``).
        options: overrides of the config's ``eval`` options.
    Returns the result on rank 0, None on other ranks.
    """
    base, tag = split_name(name)
    cfg: ModelConfig = model_info(base)
    shard_batches(0, batch_size, 0, 1)  # a bad batch size fails here, before the dataset is read
    eval_options = dict(cfg.eval)
    protocol_name = eval_options.pop("protocol", None)
    if protocol_name is None:
        raise ValueError(f"model '{base}' has no evaluation protocol in its config")
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
    result = EvalResult(model=base, weights=weights or tag or cfg.default_weights, protocol=protocol_name,
                        dataset=protocol.dataset_name, num_samples=shown, limited=limit is not None,
                        rows=_compare(metrics, cfg.reported_for(tag), protocol.dataset_name), metrics=metrics,
                        batch_size=batch_size, world_size=world)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"non-finite metric from protocol '{protocol_name}': {metrics}")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({**result.to_json(), "seconds": time.perf_counter() - start}, indent=2))
        atomic_write_text(out.with_suffix(".md"), result.table() + "\n")
    return result
