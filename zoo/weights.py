"""The weights resolver: one place that turns a weights source into tensors.

Sources (:func:`parse_source`):

- ``hf://org/repo[@revision]/path/in/repo`` — a file on the Hugging Face Hub, fetched with
  ``huggingface_hub.hf_hub_download`` at a pinned revision (default ``main``). ``hf://org/repo[@rev]``
  without a path is a converted RelZoo folder (``model.safetensors`` + ``config.json``), falling back
  to ``pytorch_model.bin`` when the repo has no safetensors.
- ``https://...`` / ``http://...`` — a plain URL, streamed with a progress bar into a temp file,
  resumed with a Range request after an interruption, checked against Content-Length and renamed
  into the cache atomically.
- anything else — a local file or converted folder (``~`` expanded; a relative path is looked up
  in the current directory, then under :func:`zoo.paths.data_root`).

Every downloaded file is verified against the expected ``sha256`` before use; a mismatch deletes
it and raises :class:`~zoo.errors.HashMismatchError` with both hashes. With no expected hash the
first complete download's hash becomes the file's pin: it is recorded in ``<file>.sha256.json``
(logged once, so it can be pinned in the config) and every later use is checked against it. A
cached file that no longer matches (the config's hash or its pin) is deleted and fetched again.

Downloads have an overall deadline (``RELZOO_DOWNLOAD_TIMEOUT``) and a stall timeout
(``RELZOO_DOWNLOAD_STALL_TIMEOUT``: seconds without a byte); a stalled or broken connection is
retried from the bytes received (a Range request). ``huggingface_hub`` cannot be interrupted in a
thread, so an ``hf://`` download runs in a child process that is stopped at the deadline (its
partial file stays in the Hugging Face cache and is resumed the next time); huggingface_hub retries
stalls itself, with ``HF_HUB_DOWNLOAD_TIMEOUT`` set to the stall timeout unless the user set it.

Cache layout, all under ``$RELZOO_HOME/hub`` (default ``~/.cache/relzoo/hub``, see
:func:`zoo.paths.relzoo_home`):

- ``url/<host>/<hash of the URL>/<file name>`` — plain downloads (+ ``.sha256.json``, ``.lock``);
- ``models--org--repo/...`` — Hub files in huggingface_hub's own layout. If ``HF_HUB_CACHE`` or
  ``HF_HOME`` is set, Hub files go to that cache instead (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)
  and are shared with other Hugging Face tools;
- ``converted/<converter>/v<version>/<source sha256>-<target layout>.safetensors`` — original
  checkpoints converted once by their map (keyed by the source's sha256, the map's name and
  version, and the target's key/shape layout) so later loads skip the conversion. Its
  ``.sha256.json`` record is checked on every read (the whole file is hashed); a converted file
  that does not match (truncated, edited, written by a killed process) is converted again.

A URL whose file torch.hub already downloaded (``$TORCH_HOME/hub/checkpoints/<file name>``, default
``~/.cache/torch/hub/checkpoints``) is copied from there instead of downloaded again, when its sha256
matches the expected one (or, with none given, the hash prefix in torch.hub's ``name-<sha256 prefix>.ext``
file name convention).

Offline (``RELZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``): the network is never touched (no socket is
opened; every huggingface_hub call runs in its offline mode); a file not in the cache raises
:class:`~zoo.errors.OfflineError` naming it and where it was looked for.

Concurrent processes fetching the same file serialise on an ``fcntl`` lock next to it, so they all
end with the one good file (``RELZOO_LOCK_TIMEOUT`` seconds, default 1800, before giving up).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo import convert, hub
from zoo._fs import CHUNK, atomic_write_text, file_lock, first_line, sha256_file, utf8_text
from zoo.checkpoint import as_state_dict, load_checkpoint, save_safetensors, state_dict_signature
from zoo.errors import CheckpointError, HashMismatchError, OfflineError, WeightsError
from zoo.hub import FOLDER_CONFIG, FOLDER_WEIGHTS, HF_FALLBACK_WEIGHTS
from zoo.paths import (data_root, download_stall_timeout, download_timeout, hf_cache_dir, hub_dir,  # noqa: F401
                       lock_timeout, offline, progress_enabled, torch_hub_checkpoints)

logger = logging.getLogger(__name__)

__all__ = ["Source", "parse_source", "fetch", "load_state_dict", "read_folder_config", "hub_dir",
           "hf_cache_dir"]

READ_SIZE = 1 << 16        # bytes asked of the socket per read: what arrived is written before the next read
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_PART_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A parsed weights source. ``kind`` is ``'hf'``, ``'url'`` or ``'local'``.

    hf: ``repo_id``, ``revision``, ``filename`` (None = a converted folder at the repo root);
    url: ``url``; local: ``path`` (resolved, may not exist).
    """

    kind: str
    text: str
    repo_id: str | None = None
    revision: str = "main"
    filename: str | None = None
    url: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        return self.text


def parse_source(source: str | os.PathLike | Source) -> Source:
    """Parse ``hf://org/repo[@rev][/path]``, an ``http(s)://`` URL, ``file://`` or a local path.

    A bad ``hf://`` spelling raises WeightsError showing the expected form.
    """
    if isinstance(source, Source):
        return source
    try:
        text = os.fspath(source)
    except TypeError:
        raise WeightsError(f"a weights source is a string or path, got {type(source).__name__}") from None
    if not isinstance(text, str):  # bytes paths
        text = os.fsdecode(text)
    if "\0" in text:
        raise WeightsError(f"bad weights source {text!r}: it holds a NUL character")
    try:
        return _parse(text)
    except (ValueError, OSError) as exc:  # urlsplit's 'Invalid IPv6 URL', a file name too long for the OS
        raise WeightsError(f"bad weights source {text!r}: {exc}") from exc


def _parse(text: str) -> Source:
    if text.startswith("hf://"):
        rest = text[len("hf://"):].strip("/")
        parts = rest.split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise WeightsError(f"bad Hugging Face source '{text}': expected hf://org/repo[@revision][/path/in/repo]")
        repo_name, _, revision = parts[1].partition("@")
        if not repo_name or (parts[1].endswith("@")):
            raise WeightsError(f"bad Hugging Face source '{text}': empty repo name or revision")
        if not all(_REPO_PART_RE.fullmatch(part) for part in (parts[0], repo_name)):
            raise WeightsError(f"bad Hugging Face source '{text}': '{parts[0]}/{repo_name}' is not a repo id "
                               f"(letters, digits, '-', '_', '.'; at most 96 characters each)")
        filename = "/".join(parts[2:]) or None
        if filename is not None and any(p in ("", ".", "..") for p in filename.split("/")):
            raise WeightsError(f"bad Hugging Face source '{text}': invalid path in repo '{filename}'")
        return Source("hf", text, repo_id=f"{parts[0]}/{repo_name}",
                      revision=urllib.parse.unquote(revision) if revision else "main", filename=filename)
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in ("http", "https"):
        return Source("url", text, url=text)
    if scheme == "file":
        return Source("local", text, path=Path(urllib.parse.unquote(urllib.parse.urlsplit(text).path)))
    if scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
        raise WeightsError(f"unsupported weights source '{text}': use hf://, http(s):// or a local path")
    return Source("local", text, path=_resolve_local(Path(text).expanduser()))


def _resolve_local(path: Path) -> Path:
    """Absolute as given; relative: the current directory if it exists there, else the data root."""
    if path.is_absolute() or path.exists():
        return path.resolve() if path.exists() else path
    try:
        candidate = data_root() / path
    except FileNotFoundError:
        return path
    return candidate if candidate.exists() else path


# --------------------------------------------------------------------------------------------
# Hashes and their records
# --------------------------------------------------------------------------------------------


def _normalise_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    sha = str(sha256).strip().lower()
    if not _SHA256_RE.match(sha):
        raise WeightsError(f"expected sha256 must be 64 hex digits, got '{sha256}'")
    return sha


def _record_path(path: Path) -> Path:
    """Where the hash record of a plain download lives: ``<file>.sha256.json`` next to it."""
    return path.with_name(path.name + ".sha256.json")


def _read_record(record_path: Path, path: Path) -> dict | None:
    """The hash record of ``path`` stored at ``record_path``, if the file is unchanged since it was recorded."""
    try:
        record = json.loads(record_path.read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    if not _SHA256_RE.match(str(record.get("sha256", ""))):
        return None
    return record


def _write_record(record_path: Path, path: Path, sha: str, source: str) -> None:
    """Record ``path``'s sha256 with its size and mtime, so an unchanged file is not hashed again."""
    stat = path.stat()
    record = {"source": source, "sha256": sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")


def _pin(record_path: Path) -> str | None:
    """The sha256 a cache file must have: the one recorded at its first complete download (even if the
    file changed since), or None without a record."""
    try:
        sha = json.loads(record_path.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) and _SHA256_RE.match(sha) else None


def _cache_hit(path: Path, record_path: Path, source: str, sha: str | None, *, fresh: bool = False) -> bool:
    """Whether the cache file ``path`` may be used: its sha256 is ``sha`` (the config's) or, without one,
    its pin (:func:`_pin`). A file that is not is deleted (the record keeps the pin) and False returned,
    so the caller fetches it again; a file with no record gets one (its hash becomes the pin).
    ``fresh``: the file was just downloaded, so a mismatch is a HashMismatchError instead."""
    if not path.is_file():
        return False
    record = _read_record(record_path, path)
    actual = record["sha256"] if record else sha256_file(path)  # a changed file is hashed again
    expected = sha or _pin(record_path)
    if expected is not None and actual != expected and fresh:
        path.unlink(missing_ok=True)
        raise _mismatch(source, expected, actual, deleted=path, pinned=None if sha else record_path)
    if expected is not None and actual != expected:
        logger.warning("cached %s does not match its %s (sha256 %s, expected %s): deleted, fetching it again",
                       source, "config's sha256" if sha else "pinned hash", actual, expected)
        path.unlink(missing_ok=True)
        return False
    if record is None:
        _write_record(record_path, path, actual, source)
        if expected is None:
            _announce_first_hash(source, actual)
    return True


def _cached_sha(path: Path, source: str) -> str:
    """sha256 of a cache file, from its record when unchanged, else computed and recorded."""
    record = _read_record(_record_path(path), path)
    if record:
        return record["sha256"]
    sha = sha256_file(path)
    _write_record(_record_path(path), path, sha, source)
    return sha


def _mismatch(source: str, expected: str, actual: str, deleted: Path | None, pinned: Path | None = None) -> HashMismatchError:
    tail = f"; the file was deleted ({deleted}), the next attempt downloads it again" if deleted else ""
    if pinned is not None:
        tail = (f"; the download was deleted. The expected hash is the one recorded when the file was first "
                f"downloaded ({pinned}): if the file was replaced on purpose, delete that record to accept the new one")
    return HashMismatchError(f"sha256 mismatch for {source}:\n  expected {expected}\n  actual   {actual}{tail}")


def _announce_first_hash(source: str, sha: str) -> None:
    logger.warning("first download recorded sha256 %s for %s; pin it as `sha256: %s` in the config", sha, source, sha)


def _cache_lock(target: Path):
    """The lock that serialises processes fetching or converting ``target`` (``<target>.lock``)."""
    return file_lock(target.with_name(target.name + ".lock"), timeout=lock_timeout(), what=f"fetching {target.name}",
                     error=WeightsError, timeout_hint="set RELZOO_LOCK_TIMEOUT")


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def fetch(source: str | os.PathLike | Source, sha256: str | None = None) -> Path:
    """Return a local path holding ``source`` (downloading it unless cached), verified against ``sha256``.

    For a folder source (a local converted folder, or ``hf://org/repo`` without a file) the folder is
    returned and ``sha256`` applies to its ``model.safetensors``. Raises WeightsError (not found,
    HTTP errors, truncated or stalled downloads, a download past ``RELZOO_DOWNLOAD_TIMEOUT``),
    HashMismatchError, or OfflineError.
    """
    src = parse_source(source)
    sha = _normalise_sha(sha256)
    try:
        if src.kind == "local":
            return _fetch_local(src, sha)
        if src.kind == "url":
            return _fetch_url(src, sha)
        return _fetch_hf(src, sha)
    except OSError as exc:  # a cache folder that cannot be written, a name the file system refuses
        raise WeightsError(f"cannot fetch {src.text}: {exc}") from exc


def _fetch_local(src: Source, sha: str | None) -> Path:
    path = src.path
    assert path is not None
    if not path.exists():
        looked = [str(path)]
        if not Path(src.text).expanduser().is_absolute():
            looked = [str(Path.cwd() / src.text)]
            with contextlib.suppress(FileNotFoundError):
                looked.append(str(data_root() / src.text))
        raise WeightsError(f"weights file not found: '{src.text}' (looked at {', '.join(looked)})")
    if sha is not None:
        target = path / FOLDER_WEIGHTS if path.is_dir() else path
        if not target.is_file():
            raise WeightsError(f"folder {path} has no {FOLDER_WEIGHTS} to check the sha256 of")
        actual = sha256_file(target)
        if actual != sha:
            raise _mismatch(str(target), sha, actual, deleted=None)  # never delete a user's own file
    return path


def _url_cache_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    name = Path(urllib.parse.unquote(parts.path)).name[-120:] or "download"  # the end keeps the suffix
    host = re.sub(r"[^\w.-]", "_", parts.netloc) or "host"
    return hub_dir() / "url" / host / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _fetch_url(src: Source, sha: str | None) -> Path:
    url = src.url
    assert url is not None
    path = _url_cache_path(url)
    record = _record_path(path)
    if _cache_hit(path, record, url, sha):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(path):
        if _cache_hit(path, record, url, sha):  # another process may have finished it meanwhile
            return path
        expected = sha or _pin(record)
        if _copy_from_torch_hub(path, url, expected):
            return path
        if offline():
            raise OfflineError(f"offline mode (RELZOO_OFFLINE / HF_HUB_OFFLINE) and {url} is not in the cache "
                               f"(looked for {path} and {torch_hub_checkpoints() / path.name}); "
                               f"download it once online or copy the file there")
        part = path.with_name(path.name + ".part")
        actual = _download(url, part, deadline=time.monotonic() + download_timeout())
        if expected is not None and actual != expected:
            part.unlink(missing_ok=True)
            raise _mismatch(url, expected, actual, deleted=path, pinned=None if sha else record)
        os.replace(part, path)
        _write_record(record, path, actual, url)
        if expected is None:
            _announce_first_hash(url, actual)
    return path


def _copy_from_torch_hub(path: Path, url: str, sha: str | None) -> bool:
    """Reuse a file torch.hub already downloaded when its hash is known to be the right one."""
    candidate = torch_hub_checkpoints() / path.name
    if not candidate.is_file():
        return False
    prefix = re.search(r"-([a-f0-9]{8,64})\.", path.name)
    if sha is None and prefix is None:
        return False
    actual = sha256_file(candidate)
    if (sha is not None and actual != sha) or (sha is None and not actual.startswith(prefix.group(1))):
        return False
    tmp = path.with_name(path.name + ".part")
    shutil.copyfile(candidate, tmp)
    os.replace(tmp, path)
    _write_record(_record_path(path), path, actual, url)
    if sha is None:
        _announce_first_hash(url, actual)
    logger.info("reused %s from torch.hub's cache", candidate)
    return True


def _download(url: str, part: Path, deadline: float, max_attempts: int = 5) -> str:
    """Stream ``url`` into ``part`` and return its sha256, by ``deadline`` (``time.monotonic()``).

    An existing ``part`` is resumed with a Range request (restarted when the server ignores it).
    A stalled connection (nothing for ``RELZOO_DOWNLOAD_STALL_TIMEOUT`` seconds), and a body shorter
    than Content-Length that made progress, are retried from the bytes received while the server
    supports ranges (else from the start), up to ``max_attempts`` and the deadline; otherwise the
    error is raised, and ``part`` is kept only when a later call can resume it (the server sent
    ``Accept-Ranges: bytes`` and a validator).
    """
    attempt = 0
    while True:
        attempt += 1
        before = part.stat().st_size if part.exists() else 0
        try:
            return _download_once(url, part, deadline)
        except _Truncated as exc:
            after = part.stat().st_size if part.exists() else 0
            if not exc.resumable:
                part.unlink(missing_ok=True)
                _part_meta_path(part).unlink(missing_ok=True)
            kept = "; a later attempt resumes the partial file" if exc.resumable else ""
            if exc.deadline:
                raise WeightsError(f"download of {url} did not finish within {download_timeout():g} s "
                                   f"(RELZOO_DOWNLOAD_TIMEOUT): {exc}; nothing was added to the cache{kept}") from exc
            if attempt < max_attempts and time.monotonic() < deadline and (exc.stalled or (exc.resumable and after > before)):
                logger.info("download of %s interrupted at %d bytes (%s); %s", url, after, exc,
                            "resuming" if exc.resumable else "starting again")
                continue
            raise WeightsError(f"download of {url} failed: {exc} (nothing was added to the cache{kept})") from exc


class _Truncated(Exception):
    """A download that ended early: ``resumable`` (the partial file may be resumed), ``stalled`` (nothing
    arrived for the stall timeout), ``deadline`` (the overall deadline passed)."""

    def __init__(self, message: str, resumable: bool, stalled: bool = False, deadline: bool = False):
        super().__init__(message)
        self.resumable, self.stalled, self.deadline = resumable, stalled, deadline


def _part_meta_path(part: Path) -> Path:
    """Sidecar of a partial download: the validator (ETag / Last-Modified) and size it belongs to."""
    return part.with_name(part.name + ".json")


def _resume_offset(url: str, part: Path) -> tuple[int, dict]:
    """Bytes of ``part`` that may be resumed, and the validator they were downloaded under.

    A partial file is only resumed when its sidecar names this URL and a validator, which goes
    out as ``If-Range``: a server whose file changed since then sends the whole new file instead.
    """
    if not part.exists():
        _part_meta_path(part).unlink(missing_ok=True)
        return 0, {}
    try:
        meta = json.loads(_part_meta_path(part).read_text())
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("url") != url or not (meta.get("etag") or meta.get("last_modified")):
        part.unlink(missing_ok=True)
        _part_meta_path(part).unlink(missing_ok=True)
        return 0, {}
    return part.stat().st_size, meta


def _download_once(url: str, part: Path, deadline: float) -> str:
    offset, meta = _resume_offset(url, part)
    headers = {"User-Agent": "relzoo", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = meta.get("etag") or meta["last_modified"]
    request = urllib.request.Request(url, headers=headers)
    stall = download_stall_timeout()
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Truncated(f"no time left for {url}", resumable=bool(offset), deadline=True)
    try:
        # the socket timeout bounds each read: a connection that sends nothing for this long has stalled
        response = urllib.request.urlopen(request, timeout=min(stall, remaining))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # our partial file is not a prefix the server recognises
            part.unlink(missing_ok=True)
            return _download_once(url, part, deadline)
        raise WeightsError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise _Truncated(f"no response within {stall:g} s (RELZOO_DOWNLOAD_STALL_TIMEOUT)",
                             resumable=bool(offset), stalled=True) from exc
        raise WeightsError(f"download of {url} failed: {reason}") from exc

    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        digest = hashlib.sha256()
        content_range = response.headers.get("Content-Range") or ""
        if (offset and response.status == 206 and _range_start(content_range) == offset
                and content_range.rsplit("/", 1)[-1] == str(meta.get("total"))):
            with open(part, "rb") as f:  # the hash covers the bytes we already have
                for block in iter(lambda: f.read(CHUNK), b""):
                    digest.update(block)
            mode = "ab"
        else:  # a fresh download, or the server ignored Range / the file changed: restart from zero
            offset, mode = 0, "wb"
            meta = {"url": url, "etag": response.headers.get("ETag"),
                    "last_modified": response.headers.get("Last-Modified"), "total": length}
            atomic_write_text(_part_meta_path(part), json.dumps(meta) + "\n")
        resumable = (response.headers.get("Accept-Ranges", "").lower() == "bytes" or mode == "ab") and bool(
            meta.get("etag") or meta.get("last_modified"))
        total = offset + length if length is not None else None
        received = 0
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=part.name[: -len(".part")], disable=not progress_enabled(), leave=False)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = response.read1(READ_SIZE)  # what has arrived, so a stall loses nothing
                    except TimeoutError as exc:
                        raise _Truncated(f"stalled after {offset + received} bytes: nothing for {stall:g} s "
                                         f"(RELZOO_DOWNLOAD_STALL_TIMEOUT)", resumable, stalled=True) from exc
                    except (OSError, ValueError, http.client.HTTPException) as exc:  # IncompleteRead, reset
                        raise _Truncated(f"connection broke after {offset + received} bytes ({exc!r})", resumable) from exc
                    if not block:
                        break
                    f.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
                    if time.monotonic() > deadline:
                        f.flush()
                        raise _Truncated(f"{offset + received} of {total or 'unknown'} bytes received", resumable,
                                         deadline=True)
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
        if length is not None and received != length:
            raise _Truncated(f"truncated body: received {offset + received} of {total} bytes", resumable)
    _part_meta_path(part).unlink(missing_ok=True)
    return digest.hexdigest()


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------


# An online Hub download runs in this child process: huggingface_hub cannot be interrupted in a thread,
# and a process can be stopped at the deadline. For each group of file names it downloads the first the
# repo has, and prints one JSON list: per group {"path"} or {"error": the exception's class names, "message"}.
_HF_SCRIPT = r"""
import json, sys
job = json.loads(sys.argv[1])
from huggingface_hub import hf_hub_download
results = []
for group in job["groups"]:
    for i, filename in enumerate(group):
        try:
            path = hf_hub_download(job["repo_id"], filename, revision=job["revision"], cache_dir=job["cache_dir"],
                                   endpoint=job["endpoint"], library_name="relzoo")
            results.append({"path": path})
            break
        except Exception as exc:
            names = [c.__name__ for c in type(exc).__mro__]
            if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names and i + 1 < len(group):
                continue  # the next name of the group
            results.append({"error": names, "message": str(exc)})
            break
print(json.dumps(results))
"""
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@contextlib.contextmanager
def _hf_offline_mode():
    """huggingface_hub's own offline mode (what ``HF_HUB_OFFLINE=1`` at its import sets), for the block:
    with it every request it would make fails before a socket is opened."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hf_files(src: Source, groups: list[list[str]]) -> list[Path | None]:
    """For each group of file names, the local path of the first the repo has (None: it has none of them),
    from the cache or downloaded. Offline (or a commit revision whose files are all cached) never opens a
    socket; an online download runs in a child process stopped at ``RELZOO_DOWNLOAD_TIMEOUT``."""
    if offline() or _COMMIT_RE.match(src.revision):
        cached = _hf_cached(src, groups)
        if offline() or all(path is not None for path in cached):
            return cached
    return _hf_download(src, groups)


def _hf_cached(src: Source, groups: list[list[str]]) -> list[Path | None]:
    """:func:`_hf_files` from the cache alone, in huggingface_hub's offline mode. A file the cache records as
    absent from the repo (huggingface_hub's ``.no_exist``) counts as absent; one never seen is an OfflineError
    when offline (else None, with the next name of its group tried)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    found: list[Path | None] = []
    with _hf_offline_mode():
        for group in groups:
            path = None
            for filename in group:
                try:
                    path = Path(hf_hub_download(src.repo_id, filename, revision=src.revision, cache_dir=str(cache),
                                                local_files_only=True, library_name="relzoo"))
                    break
                except LocalEntryNotFoundError as exc:
                    if try_to_load_from_cache(src.repo_id, filename, cache_dir=str(cache), revision=src.revision) \
                            is not None:  # not a path: huggingface_hub's marker that the repo has no such file
                        continue
                    if not offline():
                        break  # unknown: the caller asks the Hub
                    raise OfflineError(f"offline mode (RELZOO_OFFLINE / HF_HUB_OFFLINE) and "
                                       f"hf://{src.repo_id}@{src.revision}/{filename} is not in the Hugging Face "
                                       f"cache (looked in {cache})") from exc
                except (ValueError, OSError) as exc:
                    raise WeightsError(f"cannot read hf://{src.repo_id}@{src.revision}/{filename} from the "
                                       f"Hugging Face cache {cache}: {first_line(exc)}") from exc
            found.append(path)
    return found


def _hf_download(src: Source, groups: list[list[str]]) -> list[Path | None]:
    """:func:`_hf_files` online: ``hf_hub_download`` in a child process (see :data:`_HF_SCRIPT`)."""
    cache = hf_cache_dir()
    job = {"repo_id": src.repo_id, "revision": src.revision, "cache_dir": str(cache), "groups": groups,
           "endpoint": os.environ.get("HF_ENDPOINT") or None}
    env = dict(os.environ)
    env.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(max(1, round(download_stall_timeout()))))  # its per-read timeout
    if not progress_enabled():
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    timeout = download_timeout()
    where = f"hf://{src.repo_id}@{src.revision}"
    proc = subprocess.Popen([sys.executable, "-c", _HF_SCRIPT, json.dumps(job)], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the deadline, or Ctrl-C: the download stops with us
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise WeightsError(f"download of {where} did not finish within {timeout:g} s (RELZOO_DOWNLOAD_TIMEOUT); "
                               f"the partial file stays in the Hugging Face cache and is resumed next time") from exc
        raise
    try:
        results = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise WeightsError(f"cannot download {where}: the download process failed ({first_line(err or out)})") from exc
    found = []
    for group, result in zip(groups, results):
        if "path" in result:
            found.append(Path(result["path"]))
            continue
        names, message = result["error"], first_line(result["message"])
        filename = f"{where}/{group[-1]}"
        if "LocalEntryNotFoundError" in names:
            raise WeightsError(f"cannot download {filename}: the Hub is unreachable and the file is not cached "
                               f"in {cache} ({message})")
        if "EntryNotFoundError" in names:
            found.append(None)
        elif "RevisionNotFoundError" in names:
            raise WeightsError(f"{filename}: revision '{src.revision}' not found in {src.repo_id}")
        elif "RepositoryNotFoundError" in names:
            raise WeightsError(f"{filename}: repository '{src.repo_id}' not found (or private: set HF_TOKEN)")
        else:
            raise WeightsError(f"cannot download {filename}: {message}")
    return found + [None] * (len(groups) - len(found))


def _hf_in_cache(src: Source, names: list[str]) -> bool:
    """Whether one of ``names`` is in the Hugging Face cache already (a local look-up, no request)."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(src.repo_id, name, cache_dir=str(hf_cache_dir()),
                                                 revision=src.revision), str) for name in names)


def _hf_record_path(path: Path) -> Path:
    """Hash records of Hub files live outside HF's cache: ``hub/.records/hf/<path relative to the cache>``."""
    try:
        relative = path.relative_to(hf_cache_dir())
    except ValueError:
        relative = Path(hashlib.sha256(str(path).encode()).hexdigest()[:16]) / path.name
    return hub_dir() / ".records" / "hf" / relative


def _fetch_hf(src: Source, sha: str | None) -> Path:
    """A Hub file, or a folder at the repo root (our safetensors if present, else the transformers-style
    .bin, with config.json beside it), verified like every cache file (:func:`_cache_hit`): a cached
    copy that does not match is deleted and downloaded once more."""
    groups = [[src.filename]] if src.filename is not None else [[FOLDER_WEIGHTS, HF_FALLBACK_WEIGHTS], [FOLDER_CONFIG]]
    where = f"{src.text}/{groups[0][0]}" if src.filename is None else src.text
    was_cached = _hf_in_cache(src, groups[0])
    for attempt in range(2):
        weights = _hf_files(src, groups)[0]
        if weights is None and src.filename is not None:
            raise WeightsError(f"hf://{src.repo_id}@{src.revision}/{src.filename} not found: no such file in "
                               f"{src.repo_id} at revision {src.revision}")
        if weights is None:
            raise WeightsError(f"{src.text}: the repo has neither {FOLDER_WEIGHTS} nor {HF_FALLBACK_WEIGHTS} "
                               f"at revision {src.revision}; name the file: hf://{src.repo_id}@{src.revision}/FILE")
        blob = weights.resolve()
        if _cache_hit(blob, _hf_record_path(weights), where, sha, fresh=attempt == 1 or not was_cached):
            return weights if src.filename is not None else weights.parent
        weights.unlink(missing_ok=True)  # the snapshot's link to the deleted blob
    raise AssertionError("unreachable")  # the second attempt returns or raises


# --------------------------------------------------------------------------------------------
# Folders and state dicts
# --------------------------------------------------------------------------------------------


def read_folder_config(source: str | os.PathLike | Source) -> dict | None:
    """The ``config.json`` of a RelZoo folder source (``{"model", "kwargs", "converter", ...}``), else None.

    Accepts a local folder or ``hf://org/repo[@rev]`` (a folder on the Hub, fetched into the cache);
    files and URLs have no folder config and give None. A malformed config.json raises WeightsError.
    """
    src = parse_source(source)
    if src.kind == "url" or (src.kind == "hf" and src.filename is not None):
        return None
    folder = fetch(src) if src.kind == "hf" else src.path
    if folder is None or not folder.is_dir():
        return None
    return hub.read_folder_config(folder)


def load_state_dict(source: str | os.PathLike | Source, *, sha256: str | None = None,
                    converter: str | convert.ConversionMap | None = None, model: nn.Module | None = None,
                    ema: bool = False, checkpoint: Any = None) -> dict[str, Tensor]:
    """Fetch ``source`` and return its weights as a ``dict[str, Tensor]`` on the CPU.

    - A RelZoo folder (local or ``hf://org/repo``): its ``model.safetensors``.
    - ``converter`` given (an original checkpoint): converted with ``convert/<converter>.yaml``
      against ``model.state_dict()`` (when a model is given) the first time; the result is cached as
      safetensors keyed by (source sha256, converter name, converter version, target layout, ``ema``)
      and later calls read that instead. ``ema``: convert the checkpoint's EMA weights
      (:func:`zoo.convert.ema_weights`). ``checkpoint``: the file's content if the caller read it already.
    - Otherwise a ``.safetensors`` file or a flat state-dict pickle (a training container needs a
      converter: the error lists its top-level keys).

    The caller loads the result, normally with :func:`zoo.checkpoint.load_into` (strict).
    """
    src = parse_source(source)
    path = fetch(src, sha256)
    if path.is_dir():
        return hub.load_folder_weights(path)
    if converter is None:
        if ema:
            raise WeightsError(f"{src.text}: ema=True reads the EMA weights of a training checkpoint; name its "
                               "conversion map with converter=")
        return as_state_dict(load_checkpoint(path) if checkpoint is None else checkpoint, src.text)

    cmap = converter if isinstance(converter, convert.ConversionMap) else convert.load_map(converter)
    target = model.state_dict() if model is not None else None
    source_sha = _source_sha(path, src)
    layout = state_dict_signature(target) if target is not None else "any"
    cached = (hub_dir() / "converted" / cmap.name / f"v{cmap.version}" /
              f"{source_sha}-{layout}{'-ema' if ema else ''}.safetensors")
    state = _read_converted(cached)
    if state is not None:
        return state
    cached.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cached):
        state = _read_converted(cached, repair=True)
        if state is not None:
            return state
        original = load_checkpoint(path) if checkpoint is None else checkpoint
        state = convert.convert_state_dict(original, cmap, target, ema=ema)
        _write_converted(state, cached, metadata={
            "format": "pt", "source": utf8_text(src.text), "source_sha256": source_sha, "ema": str(ema).lower(),
            "converter": cmap.name, "converter_version": str(cmap.version)})
        logger.info("converted %s with map '%s' (v%d) into %s", src.text, cmap.name, cmap.version, cached)
    return state


def _read_converted(cached: Path, repair: bool = False) -> dict[str, Tensor] | None:
    """The state dict cached at ``cached`` when the file is the one written: its whole content hashes to the
    sha256 recorded beside it. Otherwise None (truncated, edited, or written by a process killed before its
    record, or by an older RelZoo); ``repair`` (under the lock): the file is deleted, to be converted again."""
    if not cached.is_file():
        return None
    recorded = _pin(_record_path(cached))
    if recorded is not None and sha256_file(cached) == recorded:
        with contextlib.suppress(CheckpointError):
            return load_checkpoint(cached)
    if repair:
        logger.warning("converted file %s does not match its recorded sha256: converting again", cached)
        cached.unlink(missing_ok=True)
    return None


def _write_converted(state: dict[str, Tensor], cached: Path, metadata: dict[str, str]) -> None:
    """Write ``state`` to ``cached`` atomically, its sha256 recorded first (a reader that sees the file sees the
    record of what it holds)."""
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    try:
        save_safetensors(state, tmp, metadata=metadata)
        _write_record(_record_path(cached), tmp, sha256_file(tmp), metadata["source"])
        os.replace(tmp, cached)
    finally:
        tmp.unlink(missing_ok=True)


def _source_sha(path: Path, src: Source) -> str:
    """The source file's sha256, from the download record when there is one."""
    if src.kind == "url":
        return _cached_sha(path, src.text)
    if src.kind == "hf":
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(_hf_record_path(path).read_text())["sha256"]
    return sha256_file(path)
