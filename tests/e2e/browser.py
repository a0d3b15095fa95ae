"""Headless Chromium over the DevTools protocol: open pages with cookies, click, type, wait, take screenshots.

The CLI `--screenshot` flag cannot send a session cookie, and the report view
is behind Airflow's auth, so the tests drive Chromium directly. `Browser` is a
small driver: enough to use Airflow's React UI as a person does (click a
button found by its `data-testid`, type into a field, wait until the page
shows something) without a WebDriver install.
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
    with Browser(cookies, size, timeout_s) as browser:
        browser.open(url)
        time.sleep(1.0)  # let images decode and layout settle
        browser.screenshot(out_png)
        return browser.text()


class Browser:
    """One headless Chromium page, driven over its DevTools websocket; a context manager."""

    def __init__(self, cookies: list[dict] | None = None, size=(1280, 1600), timeout_s: float = 60):
        self.cookies, self.size, self.timeout_s = cookies or [], size, timeout_s

    def __enter__(self) -> "Browser":
        from websockets.sync.client import connect

        self._profile = tempfile.mkdtemp(prefix="tlp-chromium-")
        self._process = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
                                          f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
                                         stderr=subprocess.PIPE, text=True)
        try:
            port = _devtools_port(self._process, self.timeout_s)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            page = next(t for t in targets if t["type"] == "page")
            self._ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout_s,
                               ping_interval=None)  # a loaded machine delays pongs; calls have their own timeouts
            self.session = _Session(self._ws)
            self.session.call("Page.enable")
            self.session.call("Network.enable")
            for cookie in self.cookies:
                self.session.call("Network.setCookie", **cookie)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_ws", None) is not None:
            self._ws.close()
        self._process.kill()
        self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.session.events.clear()
        self.session.call("Page.navigate", url=url)
        self.session.wait_event("Page.loadEventFired", self.timeout_s)

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.session.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float | None = None):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            value = self.eval(f"(v => v instanceof Node ? true : v)({expression})")  # a node cannot be returned
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"the page never showed {what} ({expression}); it shows:\n{self.text()[:3000]}")

    def click(self, selector: str) -> None:
        """Click the element a CSS selector finds, once it exists and is enabled."""
        found = json.dumps(selector)
        self.wait_for(f"(e => e && !e.disabled)(document.querySelector({found}))", f"an enabled {selector}")
        self._mouse_click(f"document.querySelector({found})")

    def click_text(self, text: str, selector: str = "button") -> None:
        """Click the first element matching `selector` whose visible text is `text` (e.g. a form section)."""
        find = (f"[...document.querySelectorAll({json.dumps(selector)})]"
                f".find(e => e.innerText.trim() === {json.dumps(text)})")
        self.wait_for(find, f"{selector} {text!r}")
        self._mouse_click(find)

    def _mouse_click(self, element: str) -> None:
        """A real mouse click (press and release) at the centre of the element an expression finds."""
        x, y = self.eval(f"(e => {{ e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); "
                         f"return [r.x + r.width / 2, r.y + r.height / 2]; }})({element})")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.session.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        """Focus a field and type `text` as keyboard input (React sees ordinary input events)."""
        found = json.dumps(selector)
        self.wait_for(f"document.querySelector({found})", selector)
        self.eval(f"document.querySelector({found}).focus()")
        self.session.call("Input.insertText", text=text)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, out_png: Path, full_page: bool = False) -> None:
        shot = self.session.call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)
        Path(out_png).write_bytes(base64.b64decode(shot["data"]))


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
