"""Environment and places: every ``RELZOO_*`` variable, and where RelZoo finds its data and cache.

All environment variables RelZoo reads are declared once in :data:`ENVIRONMENT` (README's
"Environment variables" table is generated from it) and read through the accessors below,
never with ``os.environ`` elsewhere in the package. Variables of other tools that RelZoo
honours (``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``, ``TORCH_HOME``, ``XDG_CACHE_HOME``,
``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST``, ``WORLD_SIZE``) keep their own meaning.

``configs/``, ``convert/`` and ``ops/`` live at the repository root in a source checkout
(torch.hub, editable install) and inside the package as ``zoo/_data/`` in a wheel;
:func:`data_root` hides the difference. This module imports only the standard library and :mod:`zoo.errors`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from zoo.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
_DATA_DIRS = ("configs", "convert", "ops")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: its name, the default in words, and what it does."""

    name: str
    default: str
    doc: str


ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("RELZOO_HOME", "`$XDG_CACHE_HOME/relzoo`, else `~/.cache/relzoo`",
           "cache root: downloads and conversions (`hub/`), native builds (`extensions/`)"),
    EnvVar("RELZOO_OFFLINE", "unset", "`1`: never touch the network (no socket is opened; Hub files are read in "
           "huggingface_hub's offline mode); a file not in the cache is an error (`HF_HUB_OFFLINE=1` does the same)"),
    EnvVar("RELZOO_LOCK_TIMEOUT", "1800", "seconds to wait for another process fetching or converting the same file"),
    EnvVar("RELZOO_DOWNLOAD_TIMEOUT", "3600", "seconds one download (a URL or `hf://` file, retries included) may "
           "take in all before it is stopped; its partial file is kept and resumed by the next attempt"),
    EnvVar("RELZOO_DOWNLOAD_STALL_TIMEOUT", "60", "seconds a download may receive nothing before the connection "
           "counts as stalled; a stall is retried from the bytes received"),
    EnvVar("RELZOO_NO_PROGRESS", "unset", "`1`: no progress bars (they are only shown on a terminal anyway)"),
    EnvVar("RELZOO_OPS", "auto", "what `backend=\"auto\"` means for every layer: `auto` (the fastest path: "
           "native kernels when they build, else their pure-torch fallback with one warning), `native` (a failed "
           "build is an error), `reference` (every layer runs its reference formulation; nothing is compiled)"),
    EnvVar("RELZOO_OPS_CUDA", "auto", "`1`/`0`: build the CUDA sources of native ops, or not (default: when "
           "torch has CUDA and sees a GPU)"),
    EnvVar("RELZOO_EXTENSIONS_DIR", "`$RELZOO_HOME/extensions`", "where native op builds are cached"),
    EnvVar("RELZOO_OPS_LOCK_TIMEOUT", "1800", "seconds to wait for another process building the same native op"),
    EnvVar("RELZOO_OPS_BUILD_TIMEOUT", "1800", "seconds one native build may take before it is stopped"),
    EnvVar("RELZOO_OPS_VERBOSE", "unset", "`1`: show the compiler's output of successful builds too"),
    EnvVar("RELZOO_DIST_BACKEND", "`nccl` on CUDA, else `gloo`", "torch.distributed backend of `zoo eval` "
           "under torchrun"),
    EnvVar("RELZOO_FIXTURES", "`../shared/fixtures`", "tests: the golden data of the original code"),
    EnvVar("RELZOO_REQUIRE_CUDA_BUILD", "unset", "tests: `1` makes a missing CUDA toolchain fail the CUDA "
           "compile test instead of skipping it (CI sets it)"),
    EnvVar("RELZOO_VENV", "`~/.cache/relzoo/venv`", "`scripts/setup.sh`: the virtual environment to create or reuse"),
)
_DECLARED = {var.name for var in ENVIRONMENT}


def env(name: str) -> str | None:
    """The stripped value of a declared ``RELZOO_*`` variable, or None when unset or empty."""
    if name not in _DECLARED:
        raise ConfigError(f"{name} is not a declared RelZoo environment variable (see zoo.paths.ENVIRONMENT)")
    value = os.environ.get(name, "").strip()
    return value or None


def env_flag(name: str) -> bool | None:
    """A yes/no variable: True for 1/true/yes/on, False for 0/false/no/off, None when unset.

    Any other value is a ConfigError naming the variable, rather than a silent guess."""
    value = env(name)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r}: expected one of 1, true, yes, on, 0, false, no, off")


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds; ``default`` when unset."""
    value = env(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"{name}={value!r}: expected a positive number of seconds")
    return seconds


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (case-insensitive); ``default`` when unset. Anything else is an error listing them."""
    value = (env(name) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


# --------------------------------------------------------------------------------------------
# Places
# --------------------------------------------------------------------------------------------


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


def _xdg_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".cache"


def relzoo_home() -> Path:
    """Cache root: ``$RELZOO_HOME``, else ``$XDG_CACHE_HOME/relzoo``, else ``~/.cache/relzoo``."""
    home = env("RELZOO_HOME")
    return Path(home).expanduser() if home else _xdg_cache() / "relzoo"


def hub_dir() -> Path:
    """``$RELZOO_HOME/hub``: the download and conversion cache."""
    return relzoo_home() / "hub"


def hf_cache_dir() -> Path:
    """Where Hub files go: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else :func:`hub_dir`."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return hub_dir()


def torch_hub_checkpoints() -> Path:
    """torch.hub's download folder: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/...``)."""
    torch_home = os.environ.get("TORCH_HOME")
    return (Path(torch_home).expanduser() if torch_home else _xdg_cache() / "torch") / "hub" / "checkpoints"


def extensions_dir() -> Path:
    """Where native builds are cached: ``$RELZOO_EXTENSIONS_DIR``, else ``$RELZOO_HOME/extensions``."""
    folder = env("RELZOO_EXTENSIONS_DIR")
    return Path(folder).expanduser() if folder else relzoo_home() / "extensions"


# --------------------------------------------------------------------------------------------
# Switches
# --------------------------------------------------------------------------------------------


def offline() -> bool:
    """True when ``RELZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return env_flag("RELZOO_OFFLINE") is True or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def lock_timeout() -> float:
    """``RELZOO_LOCK_TIMEOUT``: seconds to wait for another process on the same cache file (default 1800)."""
    return env_seconds("RELZOO_LOCK_TIMEOUT", 1800.0)


def download_timeout() -> float:
    """``RELZOO_DOWNLOAD_TIMEOUT``: the overall deadline of one download, in seconds (default 3600)."""
    return env_seconds("RELZOO_DOWNLOAD_TIMEOUT", 3600.0)


def download_stall_timeout() -> float:
    """``RELZOO_DOWNLOAD_STALL_TIMEOUT``: seconds without a byte before a download counts as stalled (default 60)."""
    return env_seconds("RELZOO_DOWNLOAD_STALL_TIMEOUT", 60.0)


def progress_enabled() -> bool:
    """Progress bars: on a terminal (stderr) unless ``RELZOO_NO_PROGRESS`` is set."""
    return env_flag("RELZOO_NO_PROGRESS") is not True and sys.stderr.isatty()


def disable_progress_bars() -> None:
    """Turn progress bars off for this process and the ones it starts (``--quiet``): sets ``RELZOO_NO_PROGRESS=1``."""
    os.environ["RELZOO_NO_PROGRESS"] = "1"


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on stderr, shown only when :func:`progress_enabled` (a terminal, not ``--quiet``);
    ``kwargs`` are tqdm's (``total``, ``desc``, ``unit``). Iterating it iterates ``iterable``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, disable=not progress_enabled(), **kwargs)


def environment_table() -> str:
    """The Markdown table README shows, made from :data:`ENVIRONMENT`."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    rows += [f"| `{var.name}` | {var.default} | {var.doc} |" for var in ENVIRONMENT]
    return "\n".join(rows)
