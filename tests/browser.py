"""Check a static HTML page in a real headless browser: which images loaded, what text shows, what went wrong.

Debian's Chromium (``apt-get install -y --no-install-recommends chromium``) is driven over the DevTools protocol
from Python (``websockets``; no Node, no browser download). The page is served by a loopback HTTP server that
this helper starts on the page's folder, so relative links resolve as they will on a web server or an S3 website.

Console errors are really captured: ``console.error``/``console.assert`` calls (``Runtime.consoleAPICalled``),
uncaught exceptions (``Runtime.exceptionThrown``) and browser log entries of level error
(``Log.entryAdded``: CSP, deprecations, ...) go to ``console_errors``; failed requests (404s, missing files)
are reported apart, in ``network_errors``, since a broken image already shows in ``images``.

Chromium runs in its own process group with a fresh profile and is killed by that group, also on failure. When
``/usr/bin/chromium`` is missing the calling test is skipped with the install command, unless
``FASTIMAGIC_REQUIRE_BROWSER=1`` (set it in CI), which makes it fail instead.
"""

from __future__ import annotations

import functools
import http.server
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("FASTIMAGIC_CHROMIUM", "/usr/bin/chromium"))
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
]

# The DOM state after load: every <img> (src as written, the URL it resolved to), and the visible text.
_STATE_JS = """JSON.stringify({
  images: Array.from(document.images, im => ({
    src: im.getAttribute("src"), url: im.currentSrc || im.src, complete: im.complete,
    naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight})),
  text: document.body ? document.body.innerText : "",
  title: document.title,
})"""


class BrowserError(RuntimeError):
    """Chromium did not start, or the page did not load in time."""


def require_chromium() -> Path:
    """The Chromium binary; skips the calling test (fails with FASTIMAGIC_REQUIRE_BROWSER=1) when it is missing."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = f"{CHROMIUM} not found; install Debian's browser with: {INSTALL_HINT}"
    if os.environ.get("FASTIMAGIC_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        # Browsers ask for /favicon.ico on their own; a page without one is not broken.
        if self.path == "/favicon.ico" and not os.path.exists(os.path.join(self.directory, "favicon.ico")):
            self.send_response(204)
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class _Server:
    """A loopback static file server on ``root`` in a thread (stopped by :meth:`close`)."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _Chromium:
    """Chromium with a fresh profile in its own process group; the DevTools endpoint read from its profile."""

    def __init__(self, binary: Path, timeout: float):
        self.profile = tempfile.mkdtemp(prefix="fastimagic-chromium-")
        self.log = open(os.path.join(self.profile, "stderr.log"), "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(binary), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the renderers and helpers die with it
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with code {self.proc.returncode} at start: {self._tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium did not open its DevTools port within {timeout:g}s: {self._tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text().splitlines()[0])

    def _tail(self) -> str:
        self.log.flush()
        text = Path(self.profile, "stderr.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-3:]) or "(no output)"

    def page_websocket(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
            targets = json.load(r)
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError("chromium has no page target")
        return pages[0]["webSocketDebuggerUrl"]

    def close(self) -> None:
        try:
            self._stop_group()
        finally:
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def _stop_group(self) -> None:
        # SIGTERM lets Chromium shut down its renderers and helpers; whatever is left of the group gets SIGKILL.
        pgid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.05)
            if not _group_alive(pgid):
                break


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies awaiting their reaper do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class _Session:
    """A minimal DevTools protocol client: commands by id, events collected as they arrive."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=10)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, timeout: float = 10) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise BrowserError(f"no answer to {method} within {timeout:g}s")
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})

    def wait_for(self, method: str, deadline: float) -> dict | None:
        """Collect events until ``method`` arrives (returned) or the deadline passes (None)."""
        while True:
            msg = self._recv(deadline)
            if msg is None or msg.get("method") == method:
                return msg

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._recv(deadline) is not None:
            pass

    def _recv(self, deadline: float) -> dict | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            msg = json.loads(self.ws.recv(timeout=remaining))
        except TimeoutError:
            return None
        if "method" in msg:
            self.events.append(msg)
        return msg

    def close(self) -> None:
        self.ws.close()


def _remote_object_text(arg: dict) -> str:
    if "value" in arg:
        return arg["value"] if isinstance(arg["value"], str) else json.dumps(arg["value"])
    return arg.get("description") or arg.get("unserializableValue") or arg.get("type", "")


def _collect(events: list[dict]) -> tuple[list[dict], list[dict]]:
    console, network = [], []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            frames = (params.get("stackTrace") or {}).get("callFrames") or [{}]
            console.append(
                {
                    "source": "console",
                    "text": " ".join(_remote_object_text(a) for a in params.get("args", [])),
                    "url": frames[0].get("url"),
                    "line": frames[0].get("lineNumber"),
                }
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception") or {}
            console.append(
                {
                    "source": "exception",
                    "text": exception.get("description") or details.get("text", ""),
                    "url": details.get("url"),
                    "line": details.get("lineNumber"),
                }
            )
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") != "error" or entry.get("source") == "console-api":
                continue
            item = {"source": entry.get("source"), "text": entry.get("text", ""), "url": entry.get("url")}
            (network if entry.get("source") == "network" else console).append(item)
    return console, network


def check_page(html_path: Path, *, timeout: float = 15.0, settle: float = 0.2) -> dict:
    """Load ``html_path`` in headless Chromium and report what a visitor would get.

    The page's folder is served on a loopback HTTP server, so relative links (``scenes/walk/0.png``) resolve.
    Returns ``{"url", "title", "images": [{"src" (as written), "url", "complete", "naturalWidth",
    "naturalHeight"}], "text": visible text (innerText), "console_errors": [{"source", "text", "url", ...}],
    "network_errors": [...]}``; an image that failed to load has ``naturalWidth == 0``. ``timeout``: seconds for
    the load event; ``settle``: seconds after it to collect late console messages.
    """
    binary = require_chromium()
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(html_path)
    server = _Server(html_path.parent)
    browser = session = None
    try:
        browser = _Chromium(binary, timeout)
        session = _Session(browser.page_websocket())
        for domain in ("Runtime", "Log", "Page"):
            session.send(f"{domain}.enable")
        url = server.url + urllib.request.pathname2url(html_path.name)
        result = session.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        # The load event waits for every image to load or fail.
        if session.wait_for("Page.loadEventFired", time.monotonic() + timeout) is None:
            raise BrowserError(f"{url}: no load event within {timeout:g}s")
        session.drain(settle)
        evaluated = session.send("Runtime.evaluate", {"expression": _STATE_JS, "returnByValue": True})
        if "exceptionDetails" in evaluated:
            raise BrowserError(f"reading the DOM failed: {evaluated['exceptionDetails'].get('text')}")
        state = json.loads(evaluated["result"]["value"])
        console, network = _collect(session.events)
        return {"url": url, **state, "console_errors": console, "network_errors": network}
    finally:
        if session is not None:
            session.close()
        if browser is not None:
            browser.close()
        server.close()
