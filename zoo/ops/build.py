"""The build machinery of native ops: compile on first use, under a lock, into a cache; load.

Kernel sources live in ``ops/<name>/`` (``*.cpp`` always, ``*.cu`` when CUDA is
wanted). :func:`load` compiles them with ``torch.utils.cpp_extension`` and ninja
into ``<extensions dir>/<name>-<hash>`` and loads the library; the hash covers
the sources, flags, torch and CUDA versions and the Python ABI, so a change to
any of them builds a new folder and a cached load (the common case) only
checks a manifest and ``dlopen``s the library, in well under a second.

The extensions dir is :func:`zoo.paths.extensions_dir` (``$RELZOO_EXTENSIONS_DIR``, else
``$RELZOO_HOME/extensions``). ``RELZOO_OPS`` (:func:`zoo.ops.backend.mode`) decides whether a
failed build is an error (``native``), a warning and the pure-torch path (``auto``), or whether
nothing is compiled at all (``reference``). ``RELZOO_OPS_CUDA``, ``RELZOO_OPS_LOCK_TIMEOUT``,
``RELZOO_OPS_BUILD_TIMEOUT`` and ``RELZOO_OPS_VERBOSE`` are described in :data:`zoo.paths.ENVIRONMENT`.

How a build stays safe:

* Builds of one ``<name>-<hash>`` are serialised by :func:`zoo._fs.file_lock` on
  ``<name>-<hash>.lock``. The kernel drops the lock when its holder dies, so a
  crashed build never blocks later loads; a waiter gives up after the timeout
  with a message naming the holder.
* The compiler runs in a child process inside a private folder
  ``<name>-<hash>.tmp-<pid>``; on success a manifest (size + sha256 of the
  library) is written and the folder is renamed into place (:func:`zoo._fs.replace_dir`,
  under the lock). Readers therefore see either nothing or a complete
  build, torch's own ``lock`` file never lands in the cache (torch 2.13 hangs on a
  stale one), and a timed-out compiler can be killed. A folder without a valid
  manifest, or whose library fails to load, is rebuilt. Every failure (a compiler
  error, no ninja, a timeout, Ctrl-C) removes the private folder.
* The child leads its own process group, so a timeout or Ctrl-C stops ninja and the
  compilers with it (ninja runs each compiler in a group of its own and passes SIGTERM
  on), and it stops them the same way when the builder dies (even ``kill -9``), so no
  compiler outlives the process that asked for it.

An op module (:mod:`zoo.ops.rpe_index`, :mod:`zoo.ops.neighborhood_attn`) registers its fake
kernels and autograd with :func:`on_load` and asks :func:`use_native` on every call.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from zoo._fs import file_lock, first_line, replace_dir, sha256_file
from zoo.errors import OpsError
from zoo.ops.backend import mode, resolve
from zoo.paths import env, env_flag, env_seconds, extensions_dir, ops_dir

__all__ = ["MANIFEST", "build", "load", "get_op", "native_available", "use_native", "on_load", "cuda_toolkit_home"]

NAMESPACE = "relzoo"                  # torch.ops.relzoo.<op>
MANIFEST = "relzoo-build.json"        # written last, before the atomic rename
_CACHE_FORMAT = 1                     # bump when the cache layout or the build recipe changes
_DEFAULT_ARCH_LIST = "8.0;9.0"        # CUDA targets when no GPU is visible to ask
_ESTIMATE_SECONDS = {False: 20, True: 180}  # first-build estimate (CPU / CUDA) when no earlier build is known


def _want_cuda(cuda: bool | None) -> bool:
    """The CUDA sources are built when asked, else when torch has CUDA and sees a GPU."""
    if cuda is None:
        # unset or "auto" (the documented default spelled out): no preference
        cuda = None if (env("RELZOO_OPS_CUDA") or "").lower() == "auto" else env_flag("RELZOO_OPS_CUDA")
    if cuda is None:
        return torch.version.cuda is not None and torch.cuda.is_available()
    if cuda and torch.version.cuda is None:
        raise OpsError(f"CUDA sources requested but this torch ({torch.__version__}) is built without CUDA")
    return bool(cuda)


# ----------------------------------------------------------------------------- CUDA toolchain

def _resolve_nvcc(path: Path, depth: int = 0) -> Path | None:
    """The real ``nvcc`` behind ``path``: follows symlinks and small wrapper scripts
    (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) to the toolkit's own binary."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or depth > 4:
        return None
    with open(real, "rb") as fh:
        head = fh.read(65536)
    if not head.startswith(b"#!"):
        return real  # a binary: this is the toolkit's nvcc
    for candidate in re.findall(rb"(/[^\s\"'`;|&$()]+/bin/nvcc)\b", head):
        target = Path(candidate.decode())
        if target.exists() and os.path.realpath(target) != str(real):
            resolved = _resolve_nvcc(target, depth + 1)
            if resolved is not None:
                return resolved
    return real


def cuda_toolkit_home() -> Path | None:
    """The CUDA toolkit prefix (holding ``bin/nvcc`` and ``include/cuda_runtime.h``), or None.

    ``$CUDA_HOME`` / ``$CUDA_PATH`` when they point at a toolkit, else the prefix of
    the ``nvcc`` on PATH with wrapper scripts resolved (torch's own lookup would take
    the wrapper's folder, e.g. ``/usr/local``), else ``/usr/local/cuda``.
    """
    def is_toolkit(prefix: Path) -> bool:
        return (prefix / "bin" / "nvcc").exists() and (prefix / "include" / "cuda_runtime.h").exists()

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and is_toolkit(Path(os.environ[var])):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = _resolve_nvcc(Path(nvcc))
        if real is not None and is_toolkit(real.parent.parent):
            return real.parent.parent
    return Path("/usr/local/cuda") if is_toolkit(Path("/usr/local/cuda")) else None


def _nvidia_wheel_include_dirs() -> list[str]:
    """Include folders of the pip ``nvidia-*`` CUDA wheels (``nvidia/cu13/include`` or
    ``nvidia/<lib>/include``): ATen's CUDA headers pull in e.g. ``cusparse.h`` and
    ``cublas_v2.h``, which a compiler-only toolkit lacks."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []
    for root in spec.submodule_search_locations:
        for include in sorted(Path(root).glob("*/include")):
            if include.is_dir() and str(include) not in found:
                found.append(str(include))
    return found


def _cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs' capabilities, else a default."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return _DEFAULT_ARCH_LIST


# ----------------------------------------------------------------------------- build recipe

@dataclass
class _Recipe:
    """Everything that decides a build: its hash names the cache folder."""

    name: str
    source_dir: Path
    sources: list[Path]
    cuda: bool
    cflags: list[str]
    cuda_cflags: list[str] = field(default_factory=list)
    ldflags: list[str] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)     # for the compiler child process
    key: str = ""

    @property
    def module(self) -> str:
        return f"{NAMESPACE}_{self.name}"

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.key}"


def _recipe(name: str, cuda: bool | None, source_dir: Path | None) -> _Recipe:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise OpsError(f"native op name {name!r} must be an identifier (letters, digits, '_')")
    folder = Path(source_dir) if source_dir is not None else ops_dir() / name
    if not folder.is_dir():
        known = sorted(p.name for p in ops_dir().iterdir() if p.is_dir()) if ops_dir().is_dir() else []
        raise OpsError(f"unknown native op {name!r}: no folder {folder} (known: {', '.join(known) or 'none'})")
    # an op without CUDA sources (a CPU kernel only) is the same CPU build whatever CUDA is around
    use_cuda = _want_cuda(cuda) and any(folder.glob("*.cu"))
    sources = sorted(folder.glob("*.cpp")) + (sorted(folder.glob("*.cu")) if use_cuda else [])
    if not any(s.suffix == ".cpp" for s in sources):
        raise OpsError(f"native op {name!r}: no *.cpp sources in {folder}")
    headers = sorted(p for p in folder.iterdir() if p.suffix in {".h", ".hpp", ".cuh"})

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # ATen's parallel_for is OpenMP inline code
    recipe = _Recipe(name=name, source_dir=folder, sources=sources, cuda=use_cuda,
                     cflags=["-O3", *openmp], ldflags=list(openmp))
    if use_cuda:
        home = cuda_toolkit_home()
        if home is None:
            raise OpsError("CUDA sources requested but no CUDA toolkit found: put nvcc on PATH or set CUDA_HOME")
        # The wheels' headers go AFTER the toolkit's (-isystem in the flags comes after
        # torch's own -isystem list): they may be of a newer CUDA minor version, and
        # nvcc refuses newer copies of its own headers; only missing ones are taken.
        after_toolkit = [flag for folder in _nvidia_wheel_include_dirs() for flag in ("-isystem", folder)]
        recipe.cflags += after_toolkit
        recipe.cuda_cflags = ["-O3", *after_toolkit]
        recipe.env = {"CUDA_HOME": str(home), "TORCH_CUDA_ARCH_LIST": _cuda_arch_list()}

    digest = hashlib.sha256()
    identity = {
        "format": _CACHE_FORMAT, "name": name, "cuda": use_cuda,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag, "soabi": sysconfig.get_config_var("SOABI"),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "cxx": os.environ.get("CXX", "c++"),
        "cflags": recipe.cflags, "cuda_cflags": recipe.cuda_cflags, "ldflags": recipe.ldflags,
        "include_paths": recipe.include_paths, "env": recipe.env,
    }
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for path in sources + headers:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    recipe.key = digest.hexdigest()[:16]
    return recipe


# ----------------------------------------------------------------------------- build and cache

# Runs in a child process: it compiles (and, as a check, loads) the library in
# the private folder. A child keeps torch's in-process JIT state out of ours,
# can be killed on timeout, and its output is shown only when the build fails.
# It leads its own process group. SIGTERM to that group stops the build: ninja
# passes it on to the compilers (which it runs in process groups of their own)
# and exits, then this process kills what is left of its group. It sends that
# SIGTERM itself when the builder that started it dies, even by SIGKILL.
_BUILD_SCRIPT = r"""
import json, os, signal, sys, threading, time
job = json.loads(sys.argv[1])

def stop(*_):
    time.sleep(1.0)  # ninja's turn: it stops its compilers and exits
    os.killpg(0, signal.SIGKILL)

def die_with_parent(parent):
    while os.getppid() == parent:
        time.sleep(0.2)
    os.killpg(0, signal.SIGTERM)

signal.signal(signal.SIGTERM, stop)
threading.Thread(target=die_with_parent, args=(job["parent"],), daemon=True).start()
from torch.utils.cpp_extension import load
load(name=job["module"], sources=job["sources"], extra_cflags=job["cflags"],
     extra_cuda_cflags=job["cuda_cflags"], extra_ldflags=job["ldflags"],
     extra_include_paths=job["include_paths"], build_directory=job["build_dir"],
     with_cuda=job["cuda"], is_python_module=False, verbose=job["verbose"])
"""


def _cached_library(folder: Path) -> Path | None:
    """The library of a complete build in ``folder`` (manifest present, size and sha256 match), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        library = folder / manifest["library"]
        if library.stat().st_size == manifest["size"] and sha256_file(library) == manifest["sha256"]:
            return library
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _ninja_path_env(env: dict[str, str]) -> None:
    """Make sure the child finds ``ninja`` (a venv's bin folder may not be on PATH)."""
    if shutil.which("ninja", path=env.get("PATH")):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the pip package ships the binary
        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            env["PATH"] = f"{folder}{os.pathsep}{env.get('PATH', '')}"
            return
    raise OpsError("ninja not found: `pip install ninja` (native ops are compiled with torch's cpp_extension + ninja)")


def _estimate(recipe: _Recipe, root: Path) -> str:
    """'about N s', from an earlier build of this op (same CPU/CUDA kind) if one is cached."""
    seconds = None
    for manifest in root.glob(f"{recipe.name}-*/{MANIFEST}"):
        try:
            info = json.loads(manifest.read_text())
            if info.get("cuda") == recipe.cuda:
                seconds = max(seconds or 0.0, float(info["build_seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    seconds = seconds if seconds is not None else _ESTIMATE_SECONDS[recipe.cuda]
    return f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {max(5, round(seconds, -1)):.0f} s"


def _compile(recipe: _Recipe, root: Path) -> Path:
    """Compile into a private folder, write the manifest, move it into place. Caller holds the lock."""
    tmp = root / f"{recipe.folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _compile_in(recipe, root, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failure's leftovers; a success moved the folder away


def _compile_in(recipe: _Recipe, root: Path, tmp: Path) -> Path:
    final = root / recipe.folder
    verbose = env_flag("RELZOO_OPS_VERBOSE") is True
    kind = "CPU + CUDA" if recipe.cuda else "CPU"
    print(f"RelZoo: compiling native op '{recipe.name}' ({kind}) for first use, {_estimate(recipe, root)}; "
          f"cached in {final}", file=sys.stderr, flush=True)

    job = {"module": recipe.module, "sources": [str(s) for s in recipe.sources], "cflags": recipe.cflags,
           "cuda_cflags": recipe.cuda_cflags, "ldflags": recipe.ldflags, "include_paths": recipe.include_paths,
           "build_dir": str(tmp), "cuda": recipe.cuda, "verbose": verbose, "parent": os.getpid()}
    env = {**os.environ, **recipe.env}
    _ninja_path_env(env)
    timeout = env_seconds("RELZOO_OPS_BUILD_TIMEOUT", 1800.0)
    started = time.monotonic()
    # Own process group, so a timeout or Ctrl-C stops ninja and the compilers too.
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(job)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:
        _stop(proc)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise OpsError(f"building native op '{recipe.name}' took longer than {timeout:g} s and was stopped "
                           f"(RELZOO_OPS_BUILD_TIMEOUT)") from None
        raise
    seconds = time.monotonic() - started
    output = output.strip()
    library = tmp / f"{recipe.module}.so"
    if proc.returncode != 0 or not library.exists():
        tail = output[-12000:] if output else "(no output)"
        # gcc/clang "file:12:3: error: ...", nvcc "file(12): error: ..."; else the last line (e.g. ninja's)
        first_error = next((line.strip() for line in output.splitlines()
                            if re.search(r"(:\d+:(\d+:)?|\(\d+\):) (fatal )?error", line)),
                           output.splitlines()[-1].strip() if output else "")
        hint = ("hint: native ops need a C++ compiler (g++/clang++) and ninja"
                + (f"; CUDA sources need the CUDA toolkit's nvcc with the major version of torch's CUDA "
                   f"({torch.version.cuda}), found via CUDA_HOME={recipe.env.get('CUDA_HOME')}" if recipe.cuda else "")
                + ". RELZOO_OPS=reference skips native ops (pure-torch fallbacks).")
        raise OpsError(f"building native op '{recipe.name}' ({kind}) failed after {seconds:.0f} s"
                       + (f": {first_error[:300]}" if first_error else "")
                       + f"\ncompiler output:\n{tail}\n{hint}")
    if verbose and output:
        print(output, file=sys.stderr)

    (tmp / "lock").unlink(missing_ok=True)  # torch's lock file: no business in the cache
    manifest = {
        "op": recipe.name, "library": library.name, "size": library.stat().st_size, "sha256": sha256_file(library),
        "key": recipe.key, "cuda": recipe.cuda, "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
        "sources": [s.name for s in recipe.sources], "cflags": recipe.cflags, "cuda_cflags": recipe.cuda_cflags,
        "env": recipe.env,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    replace_dir(tmp, final)  # replaces an invalid leftover (the caller checked it under the lock)
    return final / library.name


def _stop(proc: subprocess.Popen) -> None:
    """Stop a build: SIGTERM to its process group (see :data:`_BUILD_SCRIPT`), SIGKILL if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def build(name: str, cuda: bool | None = None, *, source_dir: str | Path | None = None) -> Path:
    """Compile ``ops/<name>`` if no valid cached build exists; returns the library path (not loaded).

    Args:
        name: the op folder under ``ops/`` (and the library's name).
        cuda: include the ``*.cu`` sources (True), leave them out (False), or decide
            from ``RELZOO_OPS_CUDA`` / whether torch sees a GPU (None).
        source_dir: build sources from this folder instead of ``ops/<name>``.

    Raises:
        OpsError: no sources, no toolchain, a compiler error (message holds the compiler
            output), or a lock/build timeout.
    """
    recipe = _recipe(name, cuda, Path(source_dir) if source_dir is not None else None)
    root = extensions_dir()
    library = _cached_library(root / recipe.folder)
    if library is not None:
        return library
    return _build_locked(recipe, root)


def _build_locked(recipe: _Recipe, root: Path, rebuild: bool = False) -> Path:
    """Build under the lock, unless another process finished a valid build while we waited
    (``rebuild``: compile anyway, the cached library does not load)."""
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{recipe.folder}.lock", timeout=env_seconds("RELZOO_OPS_LOCK_TIMEOUT", 1800.0),
                   what=f"building native op '{recipe.name}'", error=OpsError,
                   timeout_hint="raise RELZOO_OPS_LOCK_TIMEOUT or stop that process"):
        library = None if rebuild else _cached_library(root / recipe.folder)
        if library is not None:
            return library
        # We hold the lock, so private folders of this build are leftovers of crashed builders
        # (``.<folder>.old-*``: the old folder replace_dir moved aside).
        for leftover in [*root.glob(f"{recipe.folder}.tmp-*"), *root.glob(f".{recipe.folder}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        return _compile(recipe, root)


# ----------------------------------------------------------------------------- loading

_STATE_LOCK = threading.RLock()
_LOADED: dict[str, Path] = {}            # op name -> library loaded into this process
_FAILED: dict[str, str] = {}             # op name -> why it is unavailable (auto mode: warned once)
_ON_LOAD: dict[str, list[Callable[[], None]]] = {}
_KERNELS: dict[str, dict[str, bool]] = {}  # op name -> device type -> has a kernel (plain dict: torch.compile reads it)


def on_load(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorator: run ``fn()`` once right after op ``name``'s library is loaded into this process
    (at once if it already is). Use it to register fake kernels and autograd with ``torch.library``."""
    def decorator(fn: Callable[[], None]) -> Callable[[], None]:
        with _STATE_LOCK:
            _ON_LOAD.setdefault(name, []).append(fn)
            if name in _LOADED:
                fn()
        return fn
    return decorator


def load(name: str, cuda: bool | None = None, *, source_dir: str | Path | None = None) -> Path:
    """Build (if needed) and load op ``name`` into this process; returns the library path.

    The op's functions then live in ``torch.ops.relzoo``. Loading twice is a no-op;
    loading a *different* build of an op already loaded (e.g. CPU-only, then with
    CUDA) raises, since its schema is already registered in this process.

    Raises:
        OpsError: the build failed (see :func:`build`), ``RELZOO_OPS=reference`` is set,
            or the library does not load.
    """
    if mode() == "reference":
        raise OpsError(f"native op '{name}' not loaded: RELZOO_OPS=reference disables native ops")
    with _STATE_LOCK:
        recipe = _recipe(name, cuda, Path(source_dir) if source_dir is not None else None)
        root = extensions_dir()
        if name in _LOADED:
            if _LOADED[name].parent.name != recipe.folder:
                raise OpsError(f"native op '{name}' is already loaded in this process from {_LOADED[name]}; "
                               f"a different build ({recipe.folder}) cannot be loaded next to it")
            return _LOADED[name]
        library = _cached_library(root / recipe.folder) or _build_locked(recipe, root)
        try:
            torch.ops.load_library(str(library))
        except RuntimeError as exc:  # e.g. its ops are already registered by another library
            raise OpsError(f"native op '{name}': loading {library} failed: {exc}") from exc
        except OSError as exc:
            # A library that passes the manifest check but does not load was built
            # against something that changed underneath it: rebuild once.
            library = _build_locked(recipe, root, rebuild=True)
            try:
                torch.ops.load_library(str(library))
            except OSError as exc2:
                raise OpsError(f"native op '{name}': {library} does not load: {exc2}") from exc
        _LOADED[name] = library
        _FAILED.pop(name, None)
        _KERNELS[name] = {device_type: _has_kernel(f"{NAMESPACE}::{name}", key)
                          for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))}
        for fn in _ON_LOAD.get(name, []):
            fn()
        return library


def _has_kernel(qualified_name: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, dispatch_key)
    except RuntimeError:  # the library defines no op of that name
        return False


def get_op(name: str):
    """``torch.ops.relzoo`` with op ``name`` loaded, or None when the pure-torch path must be used.

    Honours ``RELZOO_OPS``: ``reference`` -> None without compiling; ``auto`` -> None
    after one warning if the op cannot be built/loaded (not retried in this process);
    ``native`` -> :class:`OpsError` instead.
    """
    current = mode()
    if current == "reference":
        return None
    if name in _LOADED:
        return getattr(torch.ops, NAMESPACE)
    with _STATE_LOCK:
        if current == "auto" and name in _FAILED:
            return None
        try:
            load(name)
        except OpsError as exc:
            if current == "native":
                raise
            _FAILED[name] = str(exc)
            warnings.warn(f"RelZoo: native op '{name}' unavailable, using the slower pure-torch reference "
                          f"({first_line(exc)}). Set RELZOO_OPS=native to make this an error, RELZOO_OPS=reference "
                          f"to skip native ops.", RuntimeWarning, stacklevel=2)
            return None
    return getattr(torch.ops, NAMESPACE)


def native_available(name: str, device: torch.device | str) -> bool:
    """True when op ``name`` is loaded (building it on first use, per ``RELZOO_OPS``)
    and ``torch.ops.relzoo.<name>`` has a kernel for ``device``'s type (a CPU-only
    build has none for CUDA). By convention a library's main op is named like its folder.

    Ops call :func:`use_native`, which also honours their ``backend`` argument and works
    under ``torch.compile``."""
    if get_op(name) is None:
        return False
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _KERNELS.get(name, {}).get(device_type, False)


# torch.compile runs this once while tracing (it may build and load the op) and bakes the
# answer into the graph instead of tracing the loader.
@torch.compiler.assume_constant_result
def use_native(name: str, backend: str, device_type: str) -> bool:
    """Whether op ``name`` runs its native kernel on ``device_type`` for ``backend`` (:mod:`zoo.ops.backend`).

    ``"reference"`` -> False, nothing compiled; ``"auto"`` -> :func:`native_available` (per
    ``RELZOO_OPS``); ``"native"`` -> True, or an :class:`OpsError` saying why not (the build failed,
    ``RELZOO_OPS=reference`` is set, or the build has no kernel for ``device_type``).
    """
    choice = resolve(backend, what=f"native op '{name}': backend")
    if choice == "reference":
        return False
    if choice == "auto":
        return native_available(name, device_type)
    # load once (afterwards a dict lookup, not the build recipe hashing the sources); under
    # RELZOO_OPS=reference every time, since it is load() that refuses and says why
    if name not in _LOADED or mode() == "reference":
        load(name)
    if not _KERNELS[name].get(device_type, False):
        raise OpsError(f"native op '{name}' has no kernel for device type '{device_type}' (a CPU-only build?)")
    return True
