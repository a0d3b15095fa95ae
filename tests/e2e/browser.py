"""Headless Chromium over the DevTools protocol: open a page with cookies and save a screenshot.

The CLI `--screenshot` flag cannot send a session cookie, and the report view
is behind Airflow's auth, so the test drives Chromium directly.
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--hide-scrollbars"]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, out_png: Path, cookies: list[dict] | None = None, size=(1280, 1600),
               timeout_s: float = 60) -> str:
    """Load `url` (after setting `cookies`), save a PNG, and return the page's text content."""
    profile = tempfile.mkdtemp(prefix="tlp-chromium-")
    process = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                f"--window-size={size[0]},{size[1]}", "about:blank"],
                               stderr=subprocess.PIPE, text=True)
    try:
        port = _devtools_port(process, timeout_s)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        from websockets.sync.client import connect

        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout_s) as ws:
            session = _Session(ws)
            session.call("Page.enable")
            session.call("Network.enable")
            for cookie in cookies or []:
                session.call("Network.setCookie", **cookie)
            session.call("Page.navigate", url=url)
            session.wait_event("Page.loadEventFired", timeout_s)
            time.sleep(1.0)  # let images decode and layout settle
            text = session.call("Runtime.evaluate", expression="document.body.innerText")["result"].get("value", "")
            shot = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
            Path(out_png).write_bytes(base64.b64decode(shot["data"]))
            return text
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(process: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            break
    raise RuntimeError("Chromium did not start its DevTools endpoint")


class _Session:
    """Request/response over the DevTools websocket, keeping events seen while waiting."""

    def __init__(self, ws):
        self.ws, self.ids, self.events = ws, itertools.count(1), []

    def call(self, method: str, **params):
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message.get("method"))

    def wait_event(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while name not in self.events:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} within {timeout_s}s")
            message = json.loads(self.ws.recv(timeout=timeout_s))
            self.events.append(message.get("method"))
