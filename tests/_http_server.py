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
64 KiB chunks (to make two clients overlap).

Hugging Face (what ``hf_hub_download`` asks for): ``HEAD/GET /{org}/{repo}/resolve/{rev}/{file}``
with ``ETag`` (the sha256 of the content, quoted), ``X-Repo-Commit`` and ``Content-Length``; an
unknown file is a 404 with ``X-Error-Code: EntryNotFound``, an unknown repo 404 ``RepoNotFound``,
an unknown revision 404 ``RevisionNotFound``. ``rev`` may be ``main`` or the commit hash.
``GET /api/models/{org}/{repo}[/revision/{rev}]`` returns the repo's JSON info.
"""
from __future__ import annotations

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
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

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
            self._respond(head=False)

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
            try:
                for i in range(0, len(body), _CHUNK):
                    self.wfile.write(body[i:i + _CHUNK])
                    self.wfile.flush()
                    if server.delay:
                        time.sleep(server.delay)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up; nothing to clean up
            if cut is not None:
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def serve(files: dict[str, bytes] | None = None, *, hf_repos: dict[str, dict[str, bytes]] | None = None,
          commit: str = DEFAULT_COMMIT, truncate: dict[str, int] | int | None = None, ranges: bool = True,
          delay: float = 0.0, socket_timeout: float = 10.0) -> Iterator[Server]:
    """Run a server on 127.0.0.1 for the duration of the ``with`` block (see the module docstring)."""
    state = Server(host="127.0.0.1", port=0, files=dict(files or {}), hf_repos={k: dict(v) for k, v in (hf_repos or {}).items()},
                   commit=commit, truncate=truncate, ranges=ranges, delay=delay)
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
