"""``python -m zoo demo``: every family end to end on a laptop CPU, with our RelZoo-mini models.

For each registered mini model (:data:`MINIS`) the demo

1. generates the validation split of its synthetic dataset (:mod:`zoo.data.synthetic`, a fixed
   seed and size, in the original dataset's on-disk format) under ``--data-root``;
2. loads the model by name through the normal pretrained path
   (``zoo.create_model(name, pretrained=True)``: the config's default weights entry, served by
   the weights resolver from the committed ``weights/<name>/`` folder, sha256-checked);
3. evaluates it with the family's own protocol (:func:`zoo.eval.runner.evaluate`);

and prints one table ``family | model | metric | reported | reproduced | difference``.
``--check`` exits 1 when a reproduced metric differs from the reported one by more than
:data:`TOLERANCE` points (or a mini has nothing to compare), as CI runs it.

The reported numbers in the configs were measured the same way, on the same generated split,
so the differences are 0 up to floating-point noise across machines.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from zoo.data.synthetic import MARKER, make_dataset
from zoo.errors import ConfigError
from zoo.eval import DEFAULT_BATCH_SIZE
from zoo.eval.runner import evaluate
from zoo.paths import relzoo_home
from zoo.registry import list_models, model_info

__all__ = ["MINIS", "TOLERANCE", "DemoRow", "run_demo", "format_table", "check_rows"]

#: Largest accepted |reproduced - reported|, in the metric's units (points of percent).
TOLERANCE = 0.1


@dataclass(frozen=True)
class Mini:
    """A RelZoo-mini model and the synthetic validation split it is evaluated on."""

    name: str
    kind: str          # zoo.data.synthetic kind
    seed: int = 0
    size: str = "default"


#: The minis in table order (detection, re-id, video, classification), one per family.
MINIS: tuple[Mini, ...] = (
    Mini("detr_irpe_mini", "shapes-det"),
    Mini("handraise_rpa_mini", "raised-hands"),
    Mini("rga_sc_mini", "shapes-reid"),
    Mini("rsanet_mini", "moving-shapes"),
    Mini("sasa_resnet_mini", "shapes-cls"),
)


@dataclass
class DemoRow:
    family: str
    model: str
    metric: str
    reported: Optional[float]
    reproduced: float
    not_comparable: str = ""  # why the reported number was measured on something else (zoo.eval.runner.MetricRow)

    @property
    def difference(self) -> Optional[float]:
        return None if self.reported is None else self.reproduced - self.reported


def default_data_root() -> Path:
    return relzoo_home() / "demo"


def registered_minis(names: Optional[Sequence[str]] = None) -> list[Mini]:
    """The minis that are registered, optionally only ``names`` (an unknown or unregistered name is an error)."""
    available = set(list_models())
    if names is None:
        return [m for m in MINIS if m.name in available]
    by_name = {m.name: m for m in MINIS}
    chosen = []
    for name in names:
        if name not in by_name:
            raise ConfigError(f"unknown mini model '{name}'; the minis are: {', '.join(by_name)}")
        if name not in available:
            raise ConfigError(f"mini model '{name}' is not registered in this installation")
        chosen.append(by_name[name])
    return chosen


def prepare_data(mini: Mini, data_root: Path) -> Path:
    """The mini's validation split under ``data_root/<kind>``, generated unless an identical one is there."""
    out = Path(data_root) / mini.kind
    marker = out / MARKER
    if marker.is_file():
        try:
            val = json.loads(marker.read_text(encoding="utf-8"))["splits"]["val"]
            if val.get("seed") == mini.seed and val.get("size") == mini.size:
                return out  # the generator is deterministic: the same seed and size give the same files
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return make_dataset(mini.kind, out, split="val", seed=mini.seed, size=mini.size)


def evaluate_mini(mini: Mini, data_root: Path, *, batch_size: int = DEFAULT_BATCH_SIZE,
                  progress: bool = False) -> list[DemoRow]:
    """Generate, load by name with its pretrained weights, evaluate; one row per measured metric."""
    data_dir = prepare_data(mini, data_root)
    result = evaluate(mini.name, data_dir, batch_size=batch_size, progress=progress)
    family = model_info(mini.name).family
    return [DemoRow(family, mini.name, row.metric, row.reported, row.reproduced, row.not_comparable)
            for row in result.rows]


def run_demo(data_root: Optional[Path] = None, names: Optional[Sequence[str]] = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
             progress: bool = False, log=print) -> list[DemoRow]:
    """Evaluate every registered mini (or ``names``); returns all rows (see :func:`format_table`)."""
    data_root = Path(data_root) if data_root is not None else default_data_root()
    rows: list[DemoRow] = []
    for mini in registered_minis(names):
        start = time.perf_counter()
        mini_rows = evaluate_mini(mini, data_root, batch_size=batch_size, progress=progress)
        rows.extend(mini_rows)
        if log is not None:
            log(f"{mini.name}: {mini.kind} val (seed {mini.seed}) evaluated in {time.perf_counter() - start:.1f} s")
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    """Markdown table: family | model | metric | reported | reproduced | difference."""
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    # round first, and + 0.0 turns a rounded -0.0 into 0.0, so a -0.001 shows as +0.00, not -0.00
    signed = lambda v: "" if v is None else f"{round(v, 2) + 0.0:+.2f}"  # noqa: E731
    lines = ["| family | model | metric | reported | reproduced | difference |", "|---|---|---|---|---|---|"]
    for r in rows:
        difference = "not comparable" if r.not_comparable else signed(r.difference)
        lines.append(f"| {r.family} | {r.model} | {r.metric} | {fmt(r.reported)} | {fmt(r.reproduced)} | "
                     f"{difference} |")
    return "\n".join(lines)


def check_rows(rows: Sequence[DemoRow], tolerance: float = TOLERANCE) -> list[str]:
    """Problems found: a metric off by more than ``tolerance``, one measured on another split than the
    reported one, or a model with no reported number."""
    problems = [f"{r.model} {r.metric}: not comparable ({r.not_comparable})" for r in rows if r.not_comparable]
    for r in rows:
        if r.difference is not None and abs(r.difference) > tolerance:
            problems.append(f"{r.model} {r.metric}: reproduced {r.reproduced:.4f} vs reported {r.reported:.4f} "
                            f"(difference {r.difference:+.4f}, tolerance {tolerance})")
    for model in dict.fromkeys(r.model for r in rows):
        if all(r.reported is None for r in rows if r.model == model):
            problems.append(f"{model}: no reported metric to compare with")
    if not rows:
        problems.append("no mini model is registered: nothing was evaluated")
    return problems
