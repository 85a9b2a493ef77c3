"""matplotlib, headless: figures made with the object-oriented API on the Agg canvas, never ``pyplot``.

``matplotlib`` is the ``viz`` extra (``pip install 'relzoo[viz]'``), imported only when a figure is
made, so the rest of RelZoo (evaluation and training included) runs without it. Figures are plain
``matplotlib.figure.Figure`` objects: a notebook shows them, :func:`save_figure` writes them as PNG.
"""
from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Union

from zoo._fs import atomic_write_bytes
from zoo.errors import DependencyError

__all__ = ["matplotlib_available", "new_figure", "figure_png", "save_figure", "DPI"]

#: Resolution of every PNG RelZoo writes.
DPI = 100


def matplotlib_available() -> bool:
    """Whether matplotlib (the ``viz`` extra) can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(width: float, height: float):
    """A ``Figure`` of ``width`` x ``height`` inches on the Agg canvas (no GUI, no global pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DependencyError("drawing figures needs matplotlib: pip install 'relzoo[viz]' "
                              "(or pass --no-plots where a command draws them)") from exc
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure) -> bytes:
    """The figure as PNG bytes (no timestamp or software metadata, so equal figures give equal bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def save_figure(figure, path: Union[str, os.PathLike]) -> Path:
    """Write the figure to ``path`` as PNG, atomically (readers see the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, figure_png(figure))
    return path
