"""``zoo.train.train``: train a registered model on a dataset in its original on-disk format, seeded
and deterministic on CPU, and write a converted-format folder (``python -m zoo train`` calls it).
Training starts from the constructor's initialisation, or from given weights (``weights``: fine-tuning).

The task - the training data and the loss - is the one registered for the model config's
``eval.protocol`` (:mod:`zoo.train.tasks`). Everything random is drawn from generators seeded by
``(seed, epoch, ...)``: the model's initialisation (``torch.manual_seed(seed)``), the sample order,
each sample's augmentation, and the dropout masks (the global generator, seeded once; data loading
runs in the main thread so nothing else draws from it). ``torch.use_deterministic_algorithms(True,
warn_only=True)`` is on while training, so two runs with the same arguments give the same weights on
CPU; the generators' states, the flag and the environment are restored afterwards.

The result is the folder ``zoo.hub.write_model_folder`` writes (``model.safetensors``,
``config.json`` with the constructor kwargs and the training record, ``README.md``), so
``zoo.create_model(NAME, weights=OUT)`` loads it; with ``plots`` (the default, needs matplotlib) also
``loss.png``, and ``metrics.png`` when a ``validate`` callback scored the model after every epoch.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from zoo import weights as weights_lib
from zoo._fs import sha256_file
from zoo.data.synthetic import MARKER
from zoo.errors import ConfigError
from zoo.factory import create_model
from zoo.hub import DOWNLOADING_KWARGS, model_card, write_model_folder
from zoo.paths import progress_bar
from zoo.registry import model_info, split_name
from zoo.train.tasks import DetrTask, ReidTask, TrainTask, build_task
from zoo.viz.curves import plot_loss, plot_metrics
from zoo.viz.figure import figure_png, matplotlib_available

__all__ = ["train"]



# =============================================================================================
# The training loop


def _json_kwargs(kwargs: dict) -> dict:
    """Constructor kwargs as recorded in config.json (JSON types only; no download-on-build flags)."""
    out = {k: (False if k in DOWNLOADING_KWARGS else v) for k, v in kwargs.items()}
    for key, value in out.items():
        try:
            json.dumps(value)
        except TypeError as exc:
            raise ValueError(f"model kwarg {key}={value!r} is not JSON-serialisable; a trained folder records its "
                             "constructor kwargs in config.json") from exc
    return out


def _dataset_record(data_dir: Path, task: TrainTask) -> dict:
    record = {"name": data_dir.resolve().name, **task.describe()}
    marker = data_dir / MARKER
    if marker.is_file():  # a generated dataset: enough to regenerate it
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            split = (info.get("splits") or {}).get("train") or {}
            record["synthetic"] = {"kind": info.get("kind"), "seed": split.get("seed"), "size": split.get("size")}
        except (OSError, ValueError):
            pass
    return record


class _Deterministic:
    """Context for one training run: seeds every generator (Python's, numpy's, torch's, and CUDA's when
    the run uses CUDA) with ``seed`` and turns on deterministic algorithms (and cuBLAS's deterministic workspace, unless
    ``CUBLAS_WORKSPACE_CONFIG`` is set); on exit it puts back the generators' states, the flags and
    the environment as they were, so a caller's random streams go on as if nothing had run.
    """

    _CUBLAS = "CUBLAS_WORKSPACE_CONFIG"  # cuBLAS is deterministic with it, read when CUDA starts

    def __init__(self, seed: int, device: Union[str, torch.device] = "cpu"):
        self.seed = seed
        self.device = torch.device(device)

    def __enter__(self):
        self.cuda = self.device.type == "cuda" or torch.cuda.is_initialized()
        self.saved = {
            "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if self.cuda else None,
            "flags": (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled()),
            "cublas": os.environ.get(self._CUBLAS),
        }
        if self.saved["cublas"] is None:
            os.environ[self._CUBLAS] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=True)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.default_generator.manual_seed(self.seed)
        if self.cuda:  # only then: seeding an unstarted CUDA would take effect when it starts, after the run
            torch.cuda.manual_seed_all(self.seed)
        return self

    def __exit__(self, *exc):
        saved = self.saved
        random.setstate(saved["python"])
        np.random.set_state(saved["numpy"])
        torch.set_rng_state(saved["torch"])
        if self.cuda:
            torch.cuda.set_rng_state_all(saved["cuda"])
        torch.use_deterministic_algorithms(saved["flags"][0], warn_only=saved["flags"][1])
        if saved["cublas"] is None:
            os.environ.pop(self._CUBLAS, None)
        return False


def _weights_sha256(cfg, weights: str) -> str:
    """sha256 of the weights a run started from (a folder's model.safetensors), for config.json."""
    entry = cfg.weights.get(weights)
    path = weights_lib.fetch(*((entry.source, entry.sha256) if entry is not None else (weights, None)))
    return sha256_file(path / "model.safetensors" if path.is_dir() else path)


def _lr_factor(step: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``: constant, or cosine decay to 1%."""
    if schedule == "constant" or total <= 1:
        return 1.0
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))


def train(name: str, data_dir: Union[str, Path], out_dir: Union[str, Path], *, epochs: int, batch_size: int,
          lr: float, seed: int = 0, limit: Optional[int] = None, device: Union[str, torch.device] = "cpu",
          weight_decay: float = 1e-4, lr_schedule: str = "cosine", max_grad_norm: Optional[float] = None,
          num_instances: int = 4, preprocessing: Optional[Mapping] = None,
          log: Optional[Callable[[str], None]] = print, plots: bool = True,
          validate: Optional[Callable[[torch.nn.Module], Mapping[str, float]]] = None,
          weights: Optional[str] = None, same_size_batches: float = 0.0, **model_overrides) -> Path:
    """Train the registered model ``name`` on ``data_dir`` (from scratch, or fine-tune ``weights``) and
    write it to ``out_dir``.

    Args:
        name: a registered model (no ``.tag``: training starts from the constructor's initialisation).
        data_dir: the dataset in the format of the model's ``eval.protocol`` (see :mod:`zoo.train.tasks`).
        out_dir: output folder (new, empty, or an earlier RelZoo folder, which is replaced).
        epochs, batch_size, lr: the schedule; AdamW with ``weight_decay``, lr per step by ``lr_schedule``
            ('cosine': cosine decay to 1% over all steps, or 'constant').
        seed: seeds the initialisation, the sample order, augmentation and dropout.
        limit: train on the first ``limit`` samples only.
        device: 'cpu' (deterministic) or 'cuda'.
        max_grad_norm: gradient-norm clipping; None = the family default (0.1 for DETR as the
            original, none otherwise), 0 = off.
        num_instances: K of the re-id P x K batches.
        preprocessing: fields overriding the config's :class:`~zoo.config.Preprocessing`
            (e.g. ``{"input_size": [64, 32]}``).
        same_size_batches: detection: the share of each epoch's batches made of images of (nearly) one
            size, so (nearly) unpadded (:mod:`zoo.train.tasks`); 0 = every batch random.
        log: called with one line per epoch (None: silent).
        plots: draw ``loss.png`` (and ``metrics.png``) into the folder; needs matplotlib (the ``viz``
            extra): without it a warning says so and nothing is drawn.
        validate: called with the model (in eval mode) after every epoch; returns ``{metric: value}``
            (``python -m zoo train --validate`` passes the model's evaluation protocol on the val split).
            The values per epoch go into config.json and ``metrics.png``. Its random draws do not
            change the training run's.
        weights: start from these weights (a tag of the model's config, a path, URL or ``hf://``)
            instead of the constructor's initialisation; with ``num_classes`` in ``model_overrides``
            the classifier starts new (:func:`zoo.create_model`'s rule): fine-tuning to other classes.
            config.json records the source and its sha256.
        **model_overrides: constructor kwargs over the config's (recorded in config.json).

    Returns ``out_dir``; ``zoo.create_model(name, weights=out_dir)`` loads the result.
    """
    base, tag = split_name(name)
    if tag is not None:
        raise ConfigError(f"train a model by its name without a weights tag ('{base}', not '{name}'; "
                         f"to start from those weights pass weights='{tag}')")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    cfg = model_info(base)
    kwargs = _json_kwargs({**cfg.kwargs, **model_overrides})
    say = log or (lambda line: None)
    if plots and not matplotlib_available():
        warnings.warn("matplotlib is not installed, so zoo train draws no loss.png: pip install 'relzoo[viz]' "
                      "(or pass --no-plots)", stacklevel=2)
        plots = False

    with _Deterministic(seed, device):
        model = create_model(base, weights=weights, **model_overrides).to(device)
        kwargs = _json_kwargs(model.pretrained_cfg.model_kwargs)  # with what a weights folder recorded
        model.train()
        task = build_task(model, cfg, data_dir, batch_size=batch_size, seed=seed, limit=limit,
                          preprocessing=preprocessing, num_instances=num_instances, model_kwargs=kwargs,
                          same_size_batches=same_size_batches)
        if max_grad_norm is None:
            max_grad_norm = 0.1 if isinstance(task, DetrTask) else 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(task.epoch_indices(0))
        total_steps = steps_per_epoch * epochs
        history, step_losses, validation, step = [], [], {}, 0
        say(f"training {base} on {data_dir} ({task.protocol}, {len(task)} samples, {steps_per_epoch} steps/epoch)")
        for epoch in range(epochs):
            start, losses = time.perf_counter(), []
            for batch in progress_bar(task.batches(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                                      unit="step"):
                for group in optimizer.param_groups:
                    group["lr"] = lr * _lr_factor(step, total_steps, lr_schedule)
                loss = task.loss(model, batch, device)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}, step "
                                             f"{step + 1}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                losses.append(loss.item())
                step += 1
            history.append(float(np.mean(losses)))
            step_losses += losses
            scores = _validate(validate, model, device) if validate is not None else {}
            for metric, value in scores.items():
                validation.setdefault(metric, []).append(value)
            shown = "".join(f"  {metric} {value:.2f}" for metric, value in scores.items())
            say(f"epoch {epoch + 1}/{epochs}  loss {history[-1]:.4f}{shown}  ({len(losses)} steps, "
                f"{time.perf_counter() - start:.1f} s)")
        model.eval()

    record = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
              "optimizer": "AdamW", "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "seed": seed,
              "limit": limit, "device": str(device), "preprocessing": dict(preprocessing or {}),
              "dataset": _dataset_record(data_dir, task), "final_loss": history[-1],
              "loss_per_epoch": [round(x, 6) for x in history], "torch": torch.__version__}
    if isinstance(task, ReidTask):
        record["num_instances"] = num_instances
    if same_size_batches:
        record["same_size_batches"] = same_size_batches
    if validation:
        record["val_metrics_per_epoch"] = {metric: [round(v, 4) for v in values] for metric, values in validation.items()}
    drawn = {}
    if plots:
        drawn["loss.png"] = figure_png(plot_loss(history, step_losses, title=f"{base}: training loss"))
        if validation:
            drawn["metrics.png"] = figure_png(plot_metrics(validation, title=f"{base}: validation after each epoch"))
    if weights is not None:
        record["initial_weights"] = str(weights)
        record["initial_weights_sha256"] = _weights_sha256(cfg, str(weights))
    config = {"model": base, "kwargs": kwargs, "source": "trained by zoo train", "train": record}
    start = f"from the `{weights}` weights" if weights is not None else "from scratch"
    origin = (f"Trained {start} by `python -m zoo train {base}` on `{record['dataset']['name']}` "
              f"({task.protocol} format, {len(task)} samples) for {epochs} epochs, seed {seed}; "
              f"final training loss {history[-1]:.4f}. Training hyper-parameters are in config.json.")
    return write_model_folder(out_dir, model.state_dict(), config, model_card(base, config, origin, ("trained",)),
                              extra_files=drawn)


def _validate(validate: Callable, model: torch.nn.Module, device) -> dict[str, float]:
    """``validate(model)`` in eval mode, then back to training mode; the random generators are restored
    afterwards (a DataLoader draws its seed from torch's), so validating leaves the run's randomness alone."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            scores = validate(model)
        finally:
            model.train()
    if not isinstance(scores, Mapping):
        raise TypeError(f"validate must return a mapping of metric -> value, got {type(scores).__name__}")
    return {str(metric): float(value) for metric, value in scores.items()}
