"""Native kernels: compiled on first use, cached, safe under concurrency; pure-torch fallbacks.

Kernel sources live in ``ops/<name>/`` (``*.cpp`` always, ``*.cu`` when CUDA is
wanted). :func:`load` compiles them with ``torch.utils.cpp_extension`` and ninja
into ``<extensions dir>/<name>-<hash>`` and loads the library; the hash covers
the sources, flags, torch and CUDA versions and the Python ABI, so a change to
any of them builds a new folder and a cached load (the common case) only
checks a manifest and ``dlopen``s the library, in well under a second.

The extensions dir is ``$RELZOO_EXTENSIONS_DIR``, else ``$RELZOO_HOME/extensions``
(``~/.cache/relzoo/extensions``).

Environment:

``RELZOO_OPS=auto`` (default)
    use a native kernel when it builds; otherwise warn ONCE per op and use the
    pure-torch reference.
``RELZOO_OPS=native``
    a native kernel that cannot be built or loaded raises :class:`zoo.errors.OpsError`.
``RELZOO_OPS=reference``
    never compile; always the pure-torch reference.
``RELZOO_OPS_CUDA=1|0``
    force the CUDA sources in (compiles without a GPU; needs nvcc) or out. By
    default they are built when torch has CUDA and a GPU is visible.
``RELZOO_OPS_LOCK_TIMEOUT`` / ``RELZOO_OPS_BUILD_TIMEOUT``
    seconds to wait for another process's build / for our own compiler run
    (default 1800 each).
``RELZOO_OPS_VERBOSE=1``
    show the compiler's output of successful builds too.

How a build stays safe:

* Builds of one ``<name>-<hash>`` are serialised by an ``fcntl.flock`` on
  ``<name>-<hash>.lock``. The kernel drops the lock when its holder dies, so a
  crashed build never blocks later loads; a waiter gives up after the timeout
  with a message naming the holder.
* The compiler runs in a child process inside a private folder
  ``<name>-<hash>.tmp-<pid>``; on success a manifest (size + sha256 of the
  library) is written and the folder is renamed into place atomically. Readers
  therefore see either nothing or a complete build, torch's own ``lock`` file
  never lands in the cache (torch 2.13 hangs on a stale one), and a timed-out
  compiler can be killed. A folder without a valid manifest, or whose library
  fails to load, is moved aside and rebuilt.

Adding a kernel (e.g. a neighbourhood-attention op for SASA)::

    // ops/sasa_attend/sasa_attend.cpp  -- header-light: ATen + torch/library.h
    #define TORCH_ASSERT_ONLY_METHOD_OPERATORS
    #include <ATen/core/Tensor.h>
    #include <torch/library.h>
    TORCH_LIBRARY_FRAGMENT(relzoo, m) {          // FRAGMENT: the namespace is shared
      m.def("sasa_attend(Tensor q, Tensor k, int kernel_size) -> Tensor");
    }
    TORCH_LIBRARY_IMPL(relzoo, CPU, m) { m.impl("sasa_attend", &sasa_attend_cpu); }
    // ops/sasa_attend/sasa_attend_cuda.cu: TORCH_LIBRARY_IMPL(relzoo, CUDA, m) {...}

    # zoo/layers/sasa.py
    import torch
    from zoo import ops

    @ops.on_load("sasa_attend")              # runs once, right after the library is loaded
    def _register():
        torch.library.register_fake("relzoo::sasa_attend")(lambda q, k, ks: q.new_empty(...))
        torch.library.register_autograd("relzoo::sasa_attend", _backward, setup_context=_setup)

    def sasa_attend(q, k, kernel_size):
        if ops.native_available("sasa_attend", q.device):   # honours RELZOO_OPS
            return torch.ops.relzoo.sasa_attend(q, k, kernel_size)
        return sasa_attend_reference(q, k, kernel_size)      # pure torch, the definition

Tests hold the native and reference paths equal; see :func:`rpe_index` below.
"""
from __future__ import annotations

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

from zoo.errors import OpsError
from zoo.paths import ops_dir, relzoo_home

__all__ = [
    "OpsError", "mode", "extensions_dir", "build", "load", "get_op", "native_available", "on_load",
    "cuda_toolkit_home", "rpe_index", "rpe_index_reference",
]

NAMESPACE = "relzoo"                  # torch.ops.relzoo.<op>
MANIFEST = "relzoo-build.json"        # written last, before the atomic rename
_CACHE_FORMAT = 1                     # bump when the cache layout or the build recipe changes
_MODES = ("auto", "native", "reference")
_DEFAULT_ARCH_LIST = "8.0;9.0"        # CUDA targets when no GPU is visible to ask
_ESTIMATE_SECONDS = {False: 20, True: 180}  # first-build estimate (CPU / CUDA) when no earlier build is known


# ----------------------------------------------------------------------------- modes and places

def mode() -> str:
    """``RELZOO_OPS`` (``auto`` when unset): ``auto``, ``native`` or ``reference``."""
    value = os.environ.get("RELZOO_OPS", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"RELZOO_OPS={value!r} is not one of {', '.join(_MODES)}")
    return value


def extensions_dir() -> Path:
    """Where builds are cached: ``$RELZOO_EXTENSIONS_DIR``, else ``relzoo_home()/extensions``."""
    if os.environ.get("RELZOO_EXTENSIONS_DIR"):
        return Path(os.environ["RELZOO_EXTENSIONS_DIR"]).expanduser()
    return relzoo_home() / "extensions"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None


def _want_cuda(cuda: bool | None) -> bool:
    """The CUDA sources are built when asked, else when torch has CUDA and sees a GPU."""
    if cuda is None:
        forced = os.environ.get("RELZOO_OPS_CUDA", "").strip().lower()
        if forced in {"1", "true", "yes", "on"}:
            cuda = True
        elif forced in {"0", "false", "no", "off"}:
            cuda = False
        else:
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
        raise ValueError(f"native op name {name!r} must be an identifier (letters, digits, '_')")
    folder = Path(source_dir) if source_dir is not None else ops_dir() / name
    if not folder.is_dir():
        known = sorted(p.name for p in ops_dir().iterdir() if p.is_dir()) if ops_dir().is_dir() else []
        raise OpsError(f"unknown native op {name!r}: no folder {folder} (known: {', '.join(known) or 'none'})")
    use_cuda = _want_cuda(cuda)
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


# ----------------------------------------------------------------------------- inter-process lock

class _BuildLock:
    """Exclusive ``fcntl.flock`` on a lock file, with a timeout.

    The holder writes its pid, host and start time into the file for messages.
    A lock file left behind by a crashed process is harmless: the kernel released
    its flock when the process died, so the next process acquires it at once.
    """

    def __init__(self, path: Path, timeout: float, what: str):
        self.path, self.timeout, self.what = path, timeout, what
        self.fd: int | None = None

    def __enter__(self) -> "_BuildLock":
        try:
            import fcntl
        except ImportError:
            raise OpsError("native ops are built under an fcntl lock, which this platform lacks (POSIX only)") from None

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.timeout
        told = False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    self.fd = None
                    raise OpsError(
                        f"timed out after {self.timeout:.0f} s waiting for another process ({holder}) "
                        f"to finish building {self.what} (lock {self.path}); raise RELZOO_OPS_LOCK_TIMEOUT "
                        f"or stop that process") from None
                if not told:
                    print(f"RelZoo: waiting for another process ({holder}) that is building {self.what}...",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.2)
            except OSError as exc:  # e.g. ENOLCK on a network filesystem without locking
                os.close(self.fd)
                self.fd = None
                raise OpsError(f"cannot lock {self.path} ({exc}); put the extensions cache on a local disk "
                               f"with RELZOO_EXTENSIONS_DIR") from exc
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(Path(self.path).read_text() or "{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "unknown holder"

    def __exit__(self, *exc_info) -> None:
        import fcntl

        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- build and cache

# Runs in a child process: it compiles (and, as a check, loads) the library in
# the private folder. A child keeps torch's in-process JIT state out of ours,
# can be killed on timeout, and its output is shown only when the build fails.
_BUILD_SCRIPT = r"""
import json, sys
job = json.loads(sys.argv[1])
from torch.utils.cpp_extension import load
load(name=job["module"], sources=job["sources"], extra_cflags=job["cflags"],
     extra_cuda_cflags=job["cuda_cflags"], extra_ldflags=job["ldflags"],
     extra_include_paths=job["include_paths"], build_directory=job["build_dir"],
     with_cuda=job["cuda"], is_python_module=False, verbose=job["verbose"])
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_library(folder: Path) -> Path | None:
    """The library of a complete build in ``folder`` (manifest present, size and sha256 match), else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        library = folder / manifest["library"]
        if library.stat().st_size == manifest["size"] and _sha256(library) == manifest["sha256"]:
            return library
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _discard(path: Path) -> None:
    """Move a folder aside (atomic) and delete it; never fails."""
    if not path.exists():
        return
    trash = path.with_name(f"{path.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


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
    """Compile into a private folder, write the manifest, rename into place. Caller holds the lock."""
    final = root / recipe.folder
    tmp = root / f"{recipe.folder}.tmp-{os.getpid()}"
    _discard(tmp)
    tmp.mkdir(parents=True)
    verbose = os.environ.get("RELZOO_OPS_VERBOSE", "") not in {"", "0"}
    kind = "CPU + CUDA" if recipe.cuda else "CPU"
    print(f"RelZoo: compiling native op '{recipe.name}' ({kind}) for first use, {_estimate(recipe, root)}; "
          f"cached in {final}", file=sys.stderr, flush=True)

    job = {"module": recipe.module, "sources": [str(s) for s in recipe.sources], "cflags": recipe.cflags,
           "cuda_cflags": recipe.cuda_cflags, "ldflags": recipe.ldflags, "include_paths": recipe.include_paths,
           "build_dir": str(tmp), "cuda": recipe.cuda, "verbose": verbose}
    env = {**os.environ, **recipe.env}
    _ninja_path_env(env)
    timeout = _env_float("RELZOO_OPS_BUILD_TIMEOUT", 1800.0)
    started = time.monotonic()
    # Own process group, so a timeout or Ctrl-C stops ninja and the compilers too.
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(job)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        _discard(tmp)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise OpsError(f"building native op '{recipe.name}' took longer than {timeout:g} s and was stopped "
                           f"(RELZOO_OPS_BUILD_TIMEOUT)") from None
        raise
    seconds = time.monotonic() - started
    output = output.strip()
    library = tmp / f"{recipe.module}.so"
    if proc.returncode != 0 or not library.exists():
        _discard(tmp)
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
        "op": recipe.name, "library": library.name, "size": library.stat().st_size, "sha256": _sha256(library),
        "key": recipe.key, "cuda": recipe.cuda, "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
        "sources": [s.name for s in recipe.sources], "cflags": recipe.cflags, "cuda_cflags": recipe.cuda_cflags,
        "env": recipe.env,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _discard(final)  # an invalid leftover (the caller checked it under the lock)
    os.rename(tmp, final)
    return final / library.name


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


def _build_locked(recipe: _Recipe, root: Path, discard_existing: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    timeout = _env_float("RELZOO_OPS_LOCK_TIMEOUT", 1800.0)
    with _BuildLock(root / f"{recipe.folder}.lock", timeout, f"native op '{recipe.name}'"):
        final = root / recipe.folder
        if discard_existing:
            _discard(final)
        library = _cached_library(final)
        if library is not None:  # another process finished it while we waited
            return library
        # We hold the lock, so private folders of this build are leftovers of crashed builders.
        for leftover in root.glob(f"{recipe.folder}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in root.glob(f"{recipe.folder}.old-*"):
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
            library = _build_locked(recipe, root, discard_existing=True)
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
            first_line = str(exc).splitlines()[0]
            warnings.warn(f"RelZoo: native op '{name}' unavailable, using the slower pure-torch reference "
                          f"({first_line}). Set RELZOO_OPS=native to make this an error, RELZOO_OPS=reference "
                          f"to skip native ops.", RuntimeWarning, stacklevel=2)
            return None
    return getattr(torch.ops, NAMESPACE)


def native_available(name: str, device: torch.device | str) -> bool:
    """True when op ``name`` is loaded (building it on first use, per ``RELZOO_OPS``)
    and ``torch.ops.relzoo.<name>`` has a kernel for ``device``'s type (a CPU-only
    build has none for CUDA). By convention a library's main op is named like its folder.

    Inside ``torch.compile`` wrap the call in a function decorated with
    ``torch.compiler.assume_constant_result`` (see ``_use_native_rpe_index``) so the
    loader runs once at trace time instead of being traced."""
    if get_op(name) is None:
        return False
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _KERNELS.get(name, {}).get(device_type, False)


# ----------------------------------------------------------------------------- iRPE rpe_index

_RPE_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_rpe_index_args(x: torch.Tensor, index: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError(f"rpe_index expects tensors, got {type(x).__name__} and {type(index).__name__}")
    if x.dtype not in _RPE_FLOAT_DTYPES:
        raise TypeError(f"rpe_index: x must be float64, float32, bfloat16 or float16, got {x.dtype}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rpe_index: index must be int32 or int64 bucket ids, got {index.dtype}")
    if x.dim() < 2:
        raise ValueError(f"rpe_index: x must have shape (..., Lq, num_buckets), got {tuple(x.shape)}")
    if index.dim() != 2:
        raise ValueError(f"rpe_index: index must have shape (Lq, Lk), got {tuple(index.shape)}")
    if x.shape[-2] != index.shape[0]:
        raise ValueError(f"rpe_index: x has Lq = {x.shape[-2]} rows (shape {tuple(x.shape)}) but index has "
                         f"{index.shape[0]} (shape {tuple(index.shape)})")
    if x.device != index.device:
        raise ValueError(f"rpe_index: x is on {x.device} but index is on {index.device}")


def rpe_index_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pure-torch definition: ``out[..., i, j] = x[..., i, index[i, j]]``.

    Args:
        x: (..., Lq, num_buckets) float, e.g. (B, H, Lq, nb) = q @ lookup table.
        index: (Lq, Lk) int32/int64 bucket ids in [0, num_buckets).
    Returns:
        (..., Lq, Lk), same dtype as ``x``.

    A ``gather`` along the last axis with the index broadcast over the leading
    axes: the same values as the original's flat gather with ``index[i, j] + i * nb``
    (spec irpe §6), but an out-of-range id is an error instead of a silent read
    from the next row. Its backward (scatter_add) adds in increasing j.
    """
    _check_rpe_index_args(x, index)
    return x.gather(-1, index.to(torch.int64).expand(*x.shape[:-2], *index.shape))


def rpe_index(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = x[..., i, index[i, j]]``, the gather of iRPE's contextual q/k terms.

    Args:
        x: (..., Lq, num_buckets) float64/float32/bfloat16/float16, typically (B, H, Lq, nb).
        index: (Lq, Lk) int32 or int64 bucket ids in [0, num_buckets), same device.
    Returns:
        (..., Lq, Lk) with ``x``'s dtype; differentiable in ``x``.

    Uses the native kernel ``torch.ops.relzoo.rpe_index`` (built on first use) when
    ``RELZOO_OPS`` allows and it exists for ``x``'s device, else
    :func:`rpe_index_reference`. Both give identical values; in float32/float64 the
    gradients are identical too. Works under ``torch.compile`` and ``gradcheck``.
    """
    _check_rpe_index_args(x, index)
    if _use_native_rpe_index(x.device.type):
        return torch.ops.relzoo.rpe_index(x, index)
    return rpe_index_reference(x, index)


@torch.compiler.assume_constant_result
def _use_native_rpe_index(device_type: str) -> bool:
    # torch.compile runs this once while tracing (it may build and load the op)
    # and bakes the answer into the graph instead of tracing the loader.
    return native_available("rpe_index", device_type)


@on_load("rpe_index")
def _register_rpe_index() -> None:
    """Fake kernels (shape functions for torch.compile) and autograd for the native op."""
    lib = f"{NAMESPACE}::"

    @torch.library.register_fake(lib + "rpe_index")
    def _(x, index):
        return x.new_empty((*x.shape[:-1], index.shape[1]))

    @torch.library.register_fake(lib + "rpe_index_backward")
    def _(grad_output, index, num_buckets):
        return grad_output.new_empty((*grad_output.shape[:-1], num_buckets))

    def setup_forward(ctx, inputs, output):
        x, index = inputs
        ctx.save_for_backward(index)
        ctx.num_buckets = x.shape[-1]

    def backward_forward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.ops.relzoo.rpe_index_backward(grad, index, ctx.num_buckets), None

    def setup_backward(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def backward_backward(ctx, grad):
        # the backward is linear in grad_output; its adjoint is the forward gather
        (index,) = ctx.saved_tensors
        return torch.ops.relzoo.rpe_index(grad, index), None, None

    torch.library.register_autograd(lib + "rpe_index", backward_forward, setup_context=setup_forward)
    torch.library.register_autograd(lib + "rpe_index_backward", backward_backward, setup_context=setup_backward)
