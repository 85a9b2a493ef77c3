"""Where RelZoo finds its data files and keeps its cache.

``configs/``, ``convert/`` and ``ops/`` live at the repository root in a source
checkout (torch.hub, editable install) and inside the package as ``zoo/_data/``
in a wheel. :func:`data_root` hides the difference.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_DATA_DIRS = ("configs", "convert", "ops")


@lru_cache(maxsize=None)
def data_root() -> Path:
    """The folder that holds ``configs/``, ``convert/`` and ``ops/``."""
    for candidate in (PACKAGE_DIR / "_data", PACKAGE_DIR.parent):
        if all((candidate / name).is_dir() for name in _DATA_DIRS):
            return candidate
    raise FileNotFoundError(
        f"RelZoo data folders {_DATA_DIRS} not found next to {PACKAGE_DIR}; the installation is incomplete"
    )


def configs_dir() -> Path:
    return data_root() / "configs"


def convert_dir() -> Path:
    return data_root() / "convert"


def ops_dir() -> Path:
    return data_root() / "ops"


def relzoo_home() -> Path:
    """Cache root: ``$RELZOO_HOME``, else ``$XDG_CACHE_HOME/relzoo``, else ``~/.cache/relzoo``."""
    if os.environ.get("RELZOO_HOME"):
        return Path(os.environ["RELZOO_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "relzoo"


def offline() -> bool:
    """True when ``RELZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(var, "").strip().lower() in truthy for var in ("RELZOO_OFFLINE", "HF_HUB_OFFLINE"))
