"""Small file utilities shared by the cache, the converter and the native-op builder.

- :func:`sha256_file`: the hex sha256 of a file, read in 1 MiB chunks;
- :func:`atomic_write_text`, :func:`atomic_write_bytes`: write a file so readers see the old content or the
  new, never half;
- :func:`replace_dir`: the same for a whole folder;
- :func:`file_lock`: an exclusive inter-process lock on ``<path>`` with a timeout; the kernel releases
  it when the holder dies, so a crashed process never blocks the next one;
- :func:`first_line`: the first non-blank line of an error message, for one-line reports;
- :func:`utf8_text`: a text (a file name) that can be written as UTF-8.

Only the standard library and :mod:`zoo.errors` are imported here.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from zoo.errors import ZooError

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read when hashing or copying


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the folder ``tmp`` to ``out_dir`` so readers see the old folder or the new one, never half of one."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def first_line(text: BaseException | str) -> str:
    """The first non-blank line of ``text`` (at most 300 characters); an exception's type name if it is empty."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if lines:
        return lines[0][:300]
    return type(text).__name__ if isinstance(text, BaseException) else ""


def utf8_text(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (the undecodable bytes of a file name, kept by Python as lone
    surrogates) written as ``\\udcxx`` escapes, so it can go into a JSON file, a model card or metadata."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown holder"


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike, *, timeout: float, what: str,
              error: type[ZooError] = ZooError, timeout_hint: str = "") -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` while the block runs.

    The holder writes its pid, host and start time into the file, so a waiter can say whom it
    waits for (once, on stderr's logger) and a timeout names the holder. A lock file left behind
    by a crashed process is harmless: the kernel dropped its flock, so the next process gets it
    at once. ``what`` names the work in messages; ``error`` is the error type raised on a timeout
    (after ``timeout`` seconds) or when the filesystem cannot lock; ``timeout_hint`` is appended
    to the timeout message (e.g. which variable raises the limit).
    """
    try:
        import fcntl
    except ImportError:
        raise error(f"{what} needs an fcntl file lock, which this platform lacks (POSIX only)") from None
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK on a network filesystem
                    raise error(f"cannot lock {lock_path} for {what} ({exc}); put the cache on a local disk") from exc
                if time.monotonic() > deadline:
                    hint = f"; {timeout_hint}" if timeout_hint else ""
                    raise error(f"timed out after {timeout:.0f} s waiting for another process "
                                f"({_holder(lock_path)}) to finish {what} (lock {lock_path}){hint}") from None
                if not announced:
                    logger.warning("waiting for another process (%s) to finish %s", _holder(lock_path), what)
                    announced = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
