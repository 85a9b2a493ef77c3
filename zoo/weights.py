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
first download computes one, records it in ``<file>.sha256.json`` and logs it once so it can be
pinned in the config.

Cache layout, all under ``$RELZOO_HOME/hub`` (default ``~/.cache/relzoo/hub``, see
:func:`zoo.paths.relzoo_home`):

- ``url/<host>/<hash of the URL>/<file name>`` — plain downloads (+ ``.sha256.json``, ``.lock``);
- ``models--org--repo/...`` — Hub files in huggingface_hub's own layout. If ``HF_HUB_CACHE`` or
  ``HF_HOME`` is set, Hub files go to that cache instead (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)
  and are shared with other Hugging Face tools;
- ``converted/<converter>/v<version>/<source sha256>-<target layout>.safetensors`` — original
  checkpoints converted once by their map (keyed by the source's sha256, the map's name and
  version, and the target's key/shape layout) so later loads skip the conversion.

A URL whose file torch.hub already downloaded (``$TORCH_HOME/hub/checkpoints/<file name>``, default
``~/.cache/torch/hub/checkpoints``) is copied from there instead of downloaded again, when its sha256
matches the expected one (or, with none given, the hash prefix in torch.hub's ``name-<sha256 prefix>.ext``
file name convention).

Offline (``RELZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``): the network is never touched; a file not in
the cache raises :class:`~zoo.errors.OfflineError` naming it and where it was looked for.

Concurrent processes fetching the same file serialise on an ``fcntl`` lock next to it, so they all
end with the one good file (``RELZOO_LOCK_TIMEOUT`` seconds, default 1800, before giving up).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
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
from zoo._fs import CHUNK, atomic_write_text, file_lock, first_line, sha256_file
from zoo.checkpoint import as_state_dict, load_checkpoint, save_safetensors, state_dict_signature
from zoo.errors import HashMismatchError, OfflineError, WeightsError
from zoo.hub import FOLDER_CONFIG, FOLDER_WEIGHTS, HF_FALLBACK_WEIGHTS
from zoo.paths import (data_root, hf_cache_dir, hub_dir, lock_timeout, offline, progress_enabled,  # noqa: F401
                       torch_hub_checkpoints)

logger = logging.getLogger(__name__)

__all__ = ["Source", "parse_source", "fetch", "load_state_dict", "read_folder_config", "hub_dir",
           "hf_cache_dir"]

CONNECT_TIMEOUT_S = 30.0   # per socket operation (connect, each read) of a plain download
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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
    text = os.fspath(source)
    if text.startswith("hf://"):
        rest = text[len("hf://"):].strip("/")
        parts = rest.split("/")
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise WeightsError(f"bad Hugging Face source '{text}': expected hf://org/repo[@revision][/path/in/repo]")
        repo_name, _, revision = parts[1].partition("@")
        if not repo_name or (parts[1].endswith("@")):
            raise WeightsError(f"bad Hugging Face source '{text}': empty repo name or revision")
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


def _cached_sha(path: Path, source: str) -> str:
    """sha256 of a cache file, from its record when unchanged, else computed and recorded."""
    record = _read_record(_record_path(path), path)
    if record:
        return record["sha256"]
    sha = sha256_file(path)
    _write_record(_record_path(path), path, sha, source)
    return sha


def _mismatch(source: str, expected: str, actual: str, deleted: Path | None) -> HashMismatchError:
    tail = f"; the file was deleted ({deleted}), the next attempt downloads it again" if deleted else ""
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
    HTTP errors, truncated downloads), HashMismatchError, or OfflineError.
    """
    src = parse_source(source)
    sha = _normalise_sha(sha256)
    if src.kind == "local":
        return _fetch_local(src, sha)
    if src.kind == "url":
        return _fetch_url(src, sha)
    return _fetch_hf(src, sha)


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
    name = Path(urllib.parse.unquote(parts.path)).name or "download"
    host = re.sub(r"[^\w.-]", "_", parts.netloc) or "host"
    return hub_dir() / "url" / host / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def _fetch_url(src: Source, sha: str | None) -> Path:
    url = src.url
    assert url is not None
    path = _url_cache_path(url)
    hit = _check_cached(path, url, sha)
    if hit is not None:
        return hit
    path.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(path):
        hit = _check_cached(path, url, sha)  # another process may have finished it meanwhile
        if hit is not None:
            return hit
        if _copy_from_torch_hub(path, url, sha):
            return path
        if offline():
            raise OfflineError(f"offline mode (RELZOO_OFFLINE / HF_HUB_OFFLINE) and {url} is not in the cache "
                               f"(looked for {path} and {torch_hub_checkpoints() / path.name}); "
                               f"download it once online or copy the file there")
        part = path.with_name(path.name + ".part")
        actual = _download(url, part)
        if sha is not None and actual != sha:
            part.unlink(missing_ok=True)
            raise _mismatch(url, sha, actual, deleted=path)
        os.replace(part, path)
        _write_record(_record_path(path), path, actual, url)
        if sha is None:
            _announce_first_hash(url, actual)
    return path


def _check_cached(path: Path, source: str, sha: str | None) -> Path | None:
    """The cache file if present and matching ``sha``; a mismatching one is deleted (HashMismatchError)."""
    if not path.is_file():
        return None
    actual = _cached_sha(path, source)
    if sha is not None and actual != sha:
        path.unlink(missing_ok=True)
        _record_path(path).unlink(missing_ok=True)
        raise _mismatch(source, sha, actual, deleted=path)
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


def _download(url: str, part: Path, max_attempts: int = 5) -> str:
    """Stream ``url`` into ``part`` and return its sha256.

    An existing ``part`` is resumed with a Range request (restarted when the server ignores it).
    A body shorter than Content-Length is retried while the server supports ranges and the
    attempt made progress; otherwise the error is raised, and ``part`` is kept only when a later
    call can resume it (the server sent ``Accept-Ranges: bytes``).
    """
    attempt = 0
    while True:
        attempt += 1
        before = part.stat().st_size if part.exists() else 0
        try:
            return _download_once(url, part)
        except _Truncated as exc:
            after = part.stat().st_size if part.exists() else 0
            if not exc.resumable:
                part.unlink(missing_ok=True)
                _part_meta_path(part).unlink(missing_ok=True)
            if exc.resumable and after > before and attempt < max_attempts:
                logger.info("download of %s interrupted at %d bytes; resuming", url, after)
                continue
            raise WeightsError(f"download of {url} failed: {exc} (nothing was added to the cache"
                               f"{'; a later attempt resumes the partial file' if exc.resumable else ''})") from None


class _Truncated(Exception):
    def __init__(self, message: str, resumable: bool):
        super().__init__(message)
        self.resumable = resumable


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
    if meta.get("url") != url or not (meta.get("etag") or meta.get("last_modified")):
        part.unlink(missing_ok=True)
        _part_meta_path(part).unlink(missing_ok=True)
        return 0, {}
    return part.stat().st_size, meta


def _download_once(url: str, part: Path) -> str:
    offset, meta = _resume_offset(url, part)
    headers = {"User-Agent": "relzoo", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = meta.get("etag") or meta["last_modified"]
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # our partial file is not a prefix the server recognises
            part.unlink(missing_ok=True)
            return _download_once(url, part)
        raise WeightsError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"download of {url} failed: {reason}") from None

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
                        block = response.read(CHUNK)
                    except (OSError, ValueError) as exc:  # IncompleteRead, reset, timeout
                        raise _Truncated(f"connection broke after {offset + received} bytes ({exc!r})", resumable) from None
                    if not block:
                        break
                    f.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
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


def _hf_download(src: Source, filename: str) -> Path:
    """``hf_hub_download`` with the endpoint read now (tests set ``HF_ENDPOINT`` after import)."""
    from huggingface_hub import hf_hub_download

    try:
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # huggingface_hub < 0.25 keeps them in utils
        from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError,  # type: ignore[no-redef]
                                           LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    cache = hf_cache_dir()
    where = f"hf://{src.repo_id}@{src.revision}/{filename}"
    try:
        return Path(hf_hub_download(src.repo_id, filename, revision=src.revision, cache_dir=str(cache),
                                    endpoint=os.environ.get("HF_ENDPOINT") or None, local_files_only=offline(),
                                    library_name="relzoo", tqdm_class=None if progress_enabled() else _SilentTqdm))
    except LocalEntryNotFoundError as exc:
        if offline():
            raise OfflineError(f"offline mode (RELZOO_OFFLINE / HF_HUB_OFFLINE) and {where} is not in the "
                               f"Hugging Face cache (looked in {cache})") from None
        raise WeightsError(f"cannot download {where}: the Hub is unreachable and the file is not cached "
                           f"in {cache} ({first_line(exc)})") from None
    except EntryNotFoundError:
        raise HubEntryNotFoundError(f"{where} not found: no such file in {src.repo_id} at revision {src.revision}") from None
    except RevisionNotFoundError:
        raise WeightsError(f"{where}: revision '{src.revision}' not found in {src.repo_id}") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"{where}: repository '{src.repo_id}' not found (or private: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise WeightsError(f"cannot download {where}: {first_line(exc)}") from None


class _SilentTqdm(tqdm):
    """huggingface_hub's download bars, off where RelZoo's are (output not a terminal, ``--quiet``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


class HubEntryNotFoundError(WeightsError):
    """A file that the repo does not have (lets the folder lookup fall back)."""


def _hf_record_path(path: Path) -> Path:
    """Hash records of Hub files live outside HF's cache: ``hub/.records/hf/<path relative to the cache>``."""
    try:
        relative = path.relative_to(hf_cache_dir())
    except ValueError:
        relative = Path(hashlib.sha256(str(path).encode()).hexdigest()[:16]) / path.name
    return hub_dir() / ".records" / "hf" / relative


def _verify_hf_file(path: Path, where: str, sha: str | None) -> None:
    """Check a Hub file against ``sha`` (its recorded hash when unchanged); a mismatch deletes it."""
    blob = path.resolve()
    record_path = _hf_record_path(path)
    record = _read_record(record_path, blob)
    actual = record["sha256"] if record else sha256_file(blob)
    if sha is not None and actual != sha:
        blob.unlink(missing_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink(missing_ok=True)
        record_path.unlink(missing_ok=True)
        raise _mismatch(where, sha, actual, deleted=blob)
    if record is None:
        _write_record(record_path, blob, actual, where)
        if sha is None:
            _announce_first_hash(where, actual)


def _fetch_hf(src: Source, sha: str | None) -> Path:
    if src.filename is not None:
        path = _hf_download(src, src.filename)
        _verify_hf_file(path, src.text, sha)
        return path
    # A folder at the repo root: our safetensors if present, else the transformers-style .bin.
    try:
        weights = _hf_download(src, FOLDER_WEIGHTS)
    except HubEntryNotFoundError:
        try:
            weights = _hf_download(src, HF_FALLBACK_WEIGHTS)
        except HubEntryNotFoundError:
            raise WeightsError(f"{src.text}: the repo has neither {FOLDER_WEIGHTS} nor {HF_FALLBACK_WEIGHTS} "
                               f"at revision {src.revision}; name the file: hf://{src.repo_id}@{src.revision}/FILE") from None
    with contextlib.suppress(HubEntryNotFoundError):
        _hf_download(src, FOLDER_CONFIG)
    _verify_hf_file(weights, f"{src.text}/{weights.name}", sha)
    return weights.parent


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


def load_state_dict(source: str | os.PathLike | Source, *, sha256: str | None = None, converter: str | None = None,
                    model: nn.Module | None = None, ema: bool = False, checkpoint: Any = None) -> dict[str, Tensor]:
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

    cmap = convert.load_map(converter)
    target = model.state_dict() if model is not None else None
    source_sha = _source_sha(path, src)
    layout = state_dict_signature(target) if target is not None else "any"
    cached = (hub_dir() / "converted" / cmap.name / f"v{cmap.version}" /
              f"{source_sha}-{layout}{'-ema' if ema else ''}.safetensors")
    if cached.is_file():
        return load_checkpoint(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cached):
        if cached.is_file():
            return load_checkpoint(cached)
        original = load_checkpoint(path) if checkpoint is None else checkpoint
        state = convert.convert_state_dict(original, cmap, target, ema=ema)
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        save_safetensors(state, tmp, metadata={
            "format": "pt", "source": src.text, "source_sha256": source_sha, "ema": str(ema).lower(),
            "converter": cmap.name, "converter_version": str(cmap.version)})
        os.replace(tmp, cached)
        logger.info("converted %s with map '%s' (v%d) into %s", src.text, cmap.name, cmap.version, cached)
    return state


def _source_sha(path: Path, src: Source) -> str:
    """The source file's sha256, from the download record when there is one."""
    if src.kind == "url":
        return _cached_sha(path, src.text)
    if src.kind == "hf":
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(_hf_record_path(path).read_text())["sha256"]
    return sha256_file(path)
