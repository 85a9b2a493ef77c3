"""A local HTTP server for download tests: plain files and the Hugging Face ``resolve`` endpoint.

Usage::

    from _http_server import serve

    with serve({"/w/model.pth": data}, hf_repos={"org/repo": {"model.safetensors": st}}) as server:
        url = server.url("/w/model.pth")           # http://127.0.0.1:<port>/w/model.pth
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        ...
        assert server.count("GET", "/w/model.pth") == 1

It listens on 127.0.0.1 only, on a free port, in a daemon thread; handler sockets time out after
``socket_timeout`` seconds; the server is shut down when the ``with`` block ends, even on error.

Plain files: GET (with ``Range: bytes=N-`` and ``If-Range`` support unless ``ranges=False``) and HEAD,
with an ``ETag`` derived from the content; 404 otherwise.
``truncate={path: n}`` (or an int for every file) sends only ``n`` bytes of a body while announcing
its full Content-Length, then closes the connection. ``delay`` sleeps that many seconds between
64 KiB chunks (to make two clients overlap). ``stall={path: (n, seconds)}`` sends the first ``n`` bytes
of the first GET of ``path``, then goes silent for ``seconds`` (a stalled connection; later GETs are
served normally); ``trickle`` sends every body one byte per that many seconds (a server too slow to
ever finish).

Hugging Face (what ``hf_hub_download`` asks for): ``HEAD/GET /{org}/{repo}/resolve/{rev}/{file}``
with ``ETag`` (the sha256 of the content, quoted), ``X-Repo-Commit`` and ``Content-Length``; an
unknown file is a 404 with ``X-Error-Code: EntryNotFound``, an unknown repo 404 ``RepoNotFound``,
an unknown revision 404 ``RevisionNotFound``. ``rev`` may be ``main`` or the commit hash.
``GET /api/models/{org}/{repo}[/revision/{rev}]`` returns the repo's JSON info.

Uploads (what ``HfApi.create_repo`` / ``upload_folder`` / ``create_commit`` send):

- ``POST /api/repos/create`` (409 when the repo exists), ``POST /api/validate-yaml`` (a README whose
  front matter is not YAML is a 400);
- ``POST /api/models/{repo}/preupload/{rev}``: ``.safetensors`` / ``.bin`` files are ``lfs``, others ``regular``;
- the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer: an upload action to
  ``PUT /lfs-upload/{oid}``, whose body must hash to the oid, and ``POST /lfs-verify``), used when Xet
  is off (``HF_HUB_DISABLE_XET=1``);
- Xet storage, which hf_xet uses when installed: ``GET /api/models/{repo}/xet-write-token/{rev}`` points
  it at ``/cas``, which answers the v1 protocol (global dedup and upload grants 404, so the client uploads
  ``POST /cas/v1/xorbs/...`` directly; ``POST /cas/v2/shards`` 404 so it posts ``/cas/v1/shards``). The
  xorbs and shards are kept (``server.xorbs``, ``server.shards``) but not decoded: a file uploaded
  through Xet is recorded in ``server.xet_files`` (sha256, size), not served back;
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, ``file`` base64, ``lfsFile`` by sha256):
  the repo's files change and ``server.commit`` becomes a new hash.

With ``write_token`` set, uploads need ``Authorization: Bearer <write_token>`` (else 401).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
_CHUNK = 64 * 1024


@dataclass
class Server:
    """The running server: its address, its content (mutable while running) and the request log."""

    host: str
    port: int
    files: dict[str, bytes]
    hf_repos: dict[str, dict[str, bytes]]
    commit: str = DEFAULT_COMMIT
    truncate: dict[str, int] | int | None = None
    ranges: bool = True
    delay: float = 0.0
    stall: dict[str, tuple[int, float]] = field(default_factory=dict)
    trickle: float = 0.0
    write_token: str | None = None
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)     # sha256 -> content (LFS uploads)
    xorbs: dict[str, bytes] = field(default_factory=dict)           # xorb hash -> serialized xorb (Xet uploads)
    shards: list[bytes] = field(default_factory=list)
    xet_files: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)  # repo -> path -> (sha256, size)
    commits: list[dict] = field(default_factory=list)               # {"repo", "summary", "operations"} per commit

    @property
    def endpoint(self) -> str:
        """Base address, e.g. for ``HF_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.endpoint + (path if path.startswith("/") else "/" + path)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests seen, optionally only those with this method and/or path (query string ignored)."""
        with self.lock:
            return sum(1 for m, p, _ in self.requests
                       if (method is None or m == method) and (path is None or p.split("?")[0] == path))

    def truncation_for(self, path: str) -> int | None:
        if isinstance(self.truncate, int):
            return self.truncate
        if isinstance(self.truncate, dict):
            return self.truncate.get(path)
        return None


def _handler(server: Server, socket_timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = socket_timeout  # applied to each connection's socket
        protocol_version = "HTTP/1.0"  # one request per connection: a truncated body ends at close

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._respond(head=True)

        def do_GET(self):
            if self._upload_api():
                return
            self._respond(head=False)

        def do_POST(self):
            if not self._upload_api():
                self._json(404, {"error": "not found"})

        do_PUT = do_POST

        def _respond(self, head: bool) -> None:
            path = self.path.split("?")[0]
            with server.lock:
                server.requests.append((self.command, path, dict(self.headers.items())))
            hf = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if api is not None:
                self._api(api.group(1), api.group(2) or "main", head)
            elif hf is not None and hf.group(1) in server.hf_repos:
                self._hf(hf.group(1), hf.group(2), hf.group(3), head)
            elif hf is not None:
                self._error(404, "RepoNotFound", commit=None)
            elif path in server.files:
                data = server.files[path]
                self._send(path, data, head, extra={"ETag": f'"{hashlib.sha256(data).hexdigest()[:16]}"'})
            else:
                self._error(404, None, commit=None)

        def _hf(self, repo: str, revision: str, filename: str, head: bool) -> None:
            if revision not in ("main", server.commit):
                self._error(404, "RevisionNotFound", commit=None)
                return
            files = server.hf_repos[repo]
            if filename not in files:
                self._error(404, "EntryNotFound", commit=server.commit)
                return
            data = files[filename]
            extra = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": server.commit}
            self._send(f"/{repo}/resolve/{revision}/{filename}", data, head, extra)

        def _api(self, repo: str, revision: str, head: bool) -> None:
            if repo not in server.hf_repos:
                self._error(404, "RepoNotFound", commit=None)
                return
            body = json.dumps({"id": repo, "sha": server.commit,
                               "siblings": [{"rfilename": f} for f in sorted(server.hf_repos[repo])]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Repo-Commit", server.commit)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        # -- uploads -----------------------------------------------------------------------------
        def _json(self, status: int, obj, content_type: str = "application/json") -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _upload_api(self) -> bool:
            """Answer an upload request (see the module docstring); False when the path is not one."""
            path = self.path.split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            if self.command in ("POST", "PUT"):
                with server.lock:
                    server.requests.append((self.command, path, dict(self.headers.items())))
            body = self.rfile.read(length) if length else b""
            routes = [
                ("POST", r"/api/repos/create", self._create_repo),
                ("POST", r"/api/validate-yaml", self._validate_yaml),
                ("POST", r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", self._preupload),
                ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
                ("PUT", r"/lfs-upload/([0-9a-f]{64})", self._lfs_put),
                ("POST", r"/lfs-verify", self._lfs_verify),
                ("GET", r"/api/models/([^/]+/[^/]+)/xet-write-token/([^/]+)", self._xet_token),
                ("POST", r"/cas/v1/xorbs/([^/]+)/([0-9a-f]{64})", self._xorb),
                ("POST", r"/cas/(?:v1/)?shards", self._shard),
                ("POST", r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", self._commit),
                ("POST", r"/(?:cas/)?v1/telemetry", lambda body: self._json(200, {})),
                ("POST", r"/cas/v1/xorb-grants/.*|/cas/v2/shards", lambda body: self._json(404, {"error": "not served"})),
                ("GET", r"/cas/v1/chunks/.*", lambda body: self._json(404, {"error": "no global dedup"})),
            ]
            for method, pattern, handler in routes:
                match = re.fullmatch(pattern, path)
                if match and self.command == method:
                    if method != "GET" and not self._authorised():
                        return True
                    handler(body, *match.groups())
                    return True
            return False

        def _authorised(self) -> bool:
            if server.write_token is None or self.path.startswith("/cas/") or self.path.startswith("/lfs-"):
                return True
            if self.headers.get("Authorization") == f"Bearer {server.write_token}":
                return True
            self.send_response(401)
            self.send_header("X-Error-Message", "Invalid credentials in Authorization header")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False

        def _create_repo(self, body: bytes) -> None:
            data = json.loads(body)
            repo = f"{data.get('organization') or 'user'}/{data['name']}"
            with server.lock:
                exists = repo in server.hf_repos
                server.hf_repos.setdefault(repo, {})
            url = {"url": f"{server.endpoint}/{repo}", "name": repo}
            self._json(409 if exists else 200, {**url, "error": "You already created this model repo"} if exists else url)

        def _validate_yaml(self, body: bytes) -> None:
            import yaml

            content = json.loads(body)["content"]
            try:
                if content.startswith("---\n"):
                    yaml.safe_load(content.split("---\n", 2)[1])
            except yaml.YAMLError as exc:
                self._json(400, {"error": f"invalid YAML: {exc}"})
                return
            self._json(200, {"errors": [], "warnings": []})

        def _preupload(self, body: bytes, repo: str, revision: str) -> None:
            files = json.loads(body)["files"]
            self._json(200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                        "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".bin")) else "regular"}
                                       for f in files]})

        def _lfs_batch(self, body: bytes, repo: str) -> None:
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in server.lfs_objects:
                    entry["actions"] = {"upload": {"href": f"{server.endpoint}/lfs-upload/{obj['oid']}", "header": {}},
                                        "verify": {"href": f"{server.endpoint}/lfs-verify", "header": {}}}
                objects.append(entry)
            self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def _lfs_put(self, body: bytes, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                self._json(400, {"error": "content does not match the oid"})
                return
            with server.lock:
                server.lfs_objects[oid] = body
            self._json(200, {})

        def _lfs_verify(self, body: bytes) -> None:
            oid = json.loads(body)["oid"]
            self._json(200 if oid in server.lfs_objects else 404, {})

        def _xet_token(self, body: bytes, repo: str, revision: str) -> None:
            self._json(200, {"casUrl": f"{server.endpoint}/cas", "accessToken": "loopback", "exp": int(time.time()) + 3600})

        def _xorb(self, body: bytes, prefix: str, xorb_hash: str) -> None:
            with server.lock:
                server.xorbs[xorb_hash] = body
            self._json(200, {"was_inserted": True})

        def _shard(self, body: bytes) -> None:
            with server.lock:
                server.shards.append(body)
            self._json(200, {"result": 1})

        def _commit(self, body: bytes, repo: str, revision: str) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if repo not in server.hf_repos:
                self._error(404, "RepoNotFound", commit=None)
                return
            if revision not in ("main", server.commit):
                self._error(404, "RevisionNotFound", commit=None)
                return
            operations = [line for line in lines if line["key"] != "header"]
            for op in operations:
                value = op["value"]
                missing = op["key"] == "lfsFile" and value["oid"] not in server.lfs_objects and not server.xorbs
                if op["key"] not in ("file", "lfsFile", "deletedFile") or missing:
                    self._json(400, {"error": f"cannot apply {op['key']} {value.get('path')}"})
                    return
            with server.lock:
                files = server.hf_repos[repo]
                for op in operations:
                    value = op["value"]
                    if op["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif op["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif value["oid"] in server.lfs_objects:
                        files[value["path"]] = server.lfs_objects[value["oid"]]
                    else:  # uploaded through Xet: kept as xorbs, recorded here
                        files.pop(value["path"], None)
                        server.xet_files.setdefault(repo, {})[value["path"]] = (value["oid"], int(value["size"]))
                server.commit = hashlib.sha1(body + server.commit.encode()).hexdigest()
                server.commits.append({"repo": repo, "summary": lines[0]["value"]["summary"], "operations": operations})
            self._json(200, {"commitUrl": f"{server.endpoint}/{repo}/commit/{server.commit}", "commitOid": server.commit,
                             "success": True})

        def _error(self, status: int, code: str | None, commit: str | None) -> None:
            body = json.dumps({"error": code or "not found"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send(self, path: str, data: bytes, head: bool, extra: dict[str, str]) -> None:
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "") or "")
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range != extra.get("ETag"):
                match = None  # the client's partial copy is of another version: send it all
            if server.ranges and match:
                start = int(match.group(1))
                if start >= len(data) and len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if head:
                return
            cut = server.truncation_for(path)
            if cut is not None:
                body = body[:cut]
            stall = server.stall.get(path) if server.count("GET", path) == 1 else None
            try:
                if stall is not None:
                    self.wfile.write(body[:stall[0]])
                    self.wfile.flush()
                    time.sleep(stall[1])
                    body = body[stall[0]:]
                for i in range(0, len(body), 1 if server.trickle else _CHUNK):
                    self.wfile.write(body[i:i + (1 if server.trickle else _CHUNK)])
                    self.wfile.flush()
                    if server.delay or server.trickle:
                        time.sleep(server.delay or server.trickle)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up; nothing to clean up
            if cut is not None:
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def serve(files: dict[str, bytes] | None = None, *, hf_repos: dict[str, dict[str, bytes]] | None = None,
          commit: str = DEFAULT_COMMIT, truncate: dict[str, int] | int | None = None, ranges: bool = True,
          delay: float = 0.0, socket_timeout: float = 10.0, write_token: str | None = None,
          stall: dict[str, tuple[int, float]] | None = None, trickle: float = 0.0) -> Iterator[Server]:
    """Run a server on 127.0.0.1 for the duration of the ``with`` block (see the module docstring)."""
    state = Server(host="127.0.0.1", port=0, files=dict(files or {}), hf_repos={k: dict(v) for k, v in (hf_repos or {}).items()},
                   commit=commit, truncate=truncate, ranges=ranges, delay=delay, write_token=write_token,
                   stall=dict(stall or {}), trickle=trickle)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, socket_timeout))
    httpd.daemon_threads = True
    httpd.timeout = socket_timeout
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"test-http-{state.port}", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
