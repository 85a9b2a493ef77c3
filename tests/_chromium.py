"""Headless Chromium for tests, driven through the DevTools protocol (a websocket on 127.0.0.1).

:class:`Chromium` starts Debian's ``chromium`` with a fresh profile, and :meth:`Chromium.load` opens a
page and reports what a person would notice: console errors, uncaught exceptions and failed loads
(the ``Log`` domain reports "Failed to load resource" there), every ``<img>`` and whether it
loaded, and a PNG screenshot.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--remote-debugging-port=0", "--remote-allow-origins=*",
         "--window-size=1280,900", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    url: str
    errors: list = field(default_factory=list)      # console errors, exceptions, failed loads
    images: list = field(default_factory=list)      # [src, complete, naturalWidth]
    screenshot: bytes = b""


class Chromium:
    def __init__(self, binary: str, timeout: float = 60.0):
        import websocket  # websocket-client, in the test extra

        self.profile = tempfile.mkdtemp(prefix="relzoo-chromium-")
        self.process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.timeout = timeout
        self._id = 0
        self.events: list = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def _wait_for(self, event: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {self.timeout} s")
            self.events.append(json.loads(self.ws.recv()))

    def load(self, path: Path) -> PageReport:
        url = Path(path).resolve().as_uri()
        self.events = []
        self.call("Page.navigate", url=url)
        self._wait_for("Page.loadEventFired")
        report = PageReport(url)
        report.images = self.call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"))["result"]["value"]
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                report.errors.append(f"console: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                report.errors.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                report.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")
        shot = self.call("Page.captureScreenshot", format="png")
        report.screenshot = base64.b64decode(shot["data"])
        return report

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def running_in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
