"""The reports as people see them: opened in headless Chromium, driven over the DevTools protocol.

Runs where a Chromium binary is found (``chromium`` on the PATH, or ``MMCST_CHROMIUM=/path/to/chrome``);
elsewhere it is skipped (``.ci/run`` installs Debian's ``chromium``; set ``MMCST_REQUIRE_BROWSER=1`` to make a
missing browser a failure). The protocol runs over a pipe (``--remote-debugging-pipe``): no port, no driver.
Each test saves a screenshot beside the report it opened (``report.png``).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest

from mmcst.report import pseudo_mask

ENABLE = ("install Chromium to run it (Debian: apt-get install chromium), or set MMCST_CHROMIUM to a "
          "Chrome/Chromium binary; .ci/run installs it")
MAX_HTML_BYTES = 5 * 1024 * 1024


def chromium_binary() -> Optional[str]:
    explicit = os.environ.get("MMCST_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if (path := shutil.which(name))), None)


REQUIRED = os.environ.get("MMCST_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.skipif(chromium_binary() is None and not REQUIRED, reason=f"no Chromium found: {ENABLE}")


class DevTools:
    """A Chromium process and its DevTools protocol connection on fds 3 (commands) and 4 (replies)."""

    def __init__(self, binary: str, profile_dir: Path) -> None:
        # Pipe ends at fd >= 10, so that moving them onto 3 and 4 in the child cannot overwrite one another.
        commands_read, commands_write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in os.pipe())
        replies_read, replies_write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in os.pipe())

        def child_fds() -> None:
            os.dup2(commands_read, 3)
            os.dup2(replies_write, 4)

        args = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--hide-scrollbars", "--remote-debugging-pipe",
                f"--user-data-dir={profile_dir}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root inside its sandbox
        self.process = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=child_fds, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._commands = commands_write
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._closed = False
        self._condition = threading.Condition()
        threading.Thread(target=self._read, args=(replies_read,), daemon=True).start()

    def _read(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                with self._condition:
                    for raw in messages:
                        message = json.loads(raw)
                        if "id" in message:
                            self._replies[message["id"]] = message
                        else:
                            self.events.append(message)
                    self._condition.notify_all()
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def call(self, method: str, session: Optional[str] = None, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        with self._condition:
            self._next_id += 1
            call_id = self._next_id
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._commands, data):]
        with self._condition:
            if not self._condition.wait_for(lambda: call_id in self._replies or self._closed, timeout):
                raise TimeoutError(f"DevTools: no reply to {method} in {timeout} s")
            if call_id not in self._replies:
                raise RuntimeError(f"DevTools: the browser closed before replying to {method}")
            reply = self._replies.pop(call_id)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply["result"]

    def wait_event(self, method: str, session: str, timeout: float = 60.0) -> dict[str, Any]:
        def found() -> Optional[dict[str, Any]]:
            return next((e for e in self.events if e["method"] == method and e.get("sessionId") == session), None)
        with self._condition:
            if not self._condition.wait_for(lambda: found() is not None or self._closed, timeout):
                raise TimeoutError(f"DevTools: no {method} event in {timeout} s")
            event = found()
        if event is None:
            raise RuntimeError(f"DevTools: the browser closed before {method}")
        return event

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)


class Page:
    """One tab with the report loaded; ``problems()`` lists console errors, exceptions and network requests."""

    def __init__(self, browser: DevTools, path: Path, width: int = 1280, height: int = 900) -> None:
        self.browser, self.url = browser, path.resolve().as_uri()
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", self.session)
        browser.call("Emulation.setDeviceMetricsOverride", self.session, width=width, height=height,
                     deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", self.session, url=self.url)
        browser.wait_event("Page.loadEventFired", self.session)

    def evaluate(self, expression: str) -> Any:
        reply = self.browser.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                                  awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def problems(self) -> list[str]:
        found = []
        for event in (e for e in self.browser.events if e.get("sessionId") == self.session):
            method, params = event["method"], event["params"]
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert", "warning"):
                found.append(f"console.{params['type']}: {params['args']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(f"log: {params['entry']['text']}")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if url != self.url and not url.startswith("data:"):
                    found.append(f"network request: {url}")
        return found

    def screenshot(self, path: Path) -> None:
        height = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        self.browser.call("Emulation.setDeviceMetricsOverride", self.session, width=1280, height=int(height),
                          deviceScaleFactor=1, mobile=False)
        data = self.browser.call("Page.captureScreenshot", self.session, format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    """One headless Chromium for the session (requested before ``quick_demo``, so a missing one fails fast)."""
    binary = chromium_binary()
    if binary is None or not os.access(binary, os.X_OK):
        pytest.fail(f"MMCST_REQUIRE_BROWSER=1 but no Chromium was found: {ENABLE}" if binary is None else
                    f"MMCST_CHROMIUM={binary} is not an executable file")
    devtools = DevTools(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        devtools.call("Browser.getVersion", timeout=60)
        yield devtools
    finally:
        devtools.close()


# ------------------------------------------------------------------------------------------------ checks

def _resolve(data: Any, key: list[str]) -> Any:
    for part in key:
        data = data[part]
    return data


def assert_tables_show_json(page: Page, source: dict[str, Any]) -> int:
    """Every keyed cell shows its JSON value (numbers to the digits shown); returns how many were checked."""
    cells = page.evaluate("Array.from(document.querySelectorAll('[data-key]'))"
                          ".map(c => [JSON.parse(c.dataset.key), c.textContent.trim()])")
    for key, text in cells:
        value = _resolve(source, key)
        if value is None:
            assert text == "–", (key, text)
        elif isinstance(value, str):
            assert text == value, (key, text, value)
        else:
            digits = len(text.split(".")[1]) if "." in text else 0
            assert abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-9, (key, text, value)
    return len(cells)


def assert_page_is_clean(page: Page) -> None:
    assert page.problems() == []
    decoded = page.evaluate("Promise.all(Array.from(document.images).map("
                            "i => i.decode().then(() => [i.alt, i.naturalWidth], () => [i.alt, 0])))")
    assert decoded and all(width > 0 for _, width in decoded), decoded
    text = page.evaluate("document.body.innerText")
    for marker in ("**", "`", "|---", "](", "<b>", "&lt;"):
        assert marker not in text, f"raw markup {marker!r} in the visible text"


def explorer_payload(html: str, key: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, flags=re.S)
    assert match, "no embedded report data"
    return json.loads(match.group(1))["explorers"][key]


SHOW_MASK = """(async function (method, threshold, image) {
  const root = document.querySelector('[data-explorer]');
  const select = root.querySelector('[data-control=method]');
  if (select) { select.value = String(method); select.dispatchEvent(new Event('change')); }
  const slider = root.querySelector('[data-control=threshold]');
  slider.value = String(threshold); slider.dispatchEvent(new Event('input'));
  const canvas = root.querySelector('[data-image-index="' + image + '"] [data-layer=mask]');
  const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let text = '';
  for (let i = 0; i < pixels.length; i++) text += String.fromCharCode(pixels[i]);
  return {threshold: root.dataset.threshold, readout: root.querySelector('[data-readout=threshold]').textContent,
          width: canvas.width, height: canvas.height, rgba: btoa(text)};
})"""


def show_mask(page: Page, method: int, threshold: float, image: int) -> dict[str, Any]:
    return page.evaluate(f"{SHOW_MASK}({method}, {threshold}, {image})")


def assert_mask_follows_the_rule(page: Page, payload: dict[str, Any], method: int) -> None:
    """The page's mask equals :func:`pseudo_mask` on the embedded maps, and moving t changes it.

    The image is the first whose maps give different masks at the two thresholds (a briefly trained model can
    leave an image's maps flat, and then no threshold changes its mask, in the page or in the rule).
    """
    def decoded(entry: dict[str, Any]) -> np.ndarray:
        shape = (len(entry["keys"]), entry["height"], entry["width"])
        return np.frombuffer(base64.b64decode(entry["data"]), np.uint8).reshape(shape) / 255.0

    def changes(entry: dict[str, Any]) -> bool:
        keys, maps = np.asarray(entry["keys"]), decoded(entry)
        return not np.array_equal(pseudo_mask(keys, maps, 0.05), pseudo_mask(keys, maps, 0.5))

    entries = payload["methods"][method]["maps"]
    candidates = [i for i, e in enumerate(entries) if e["keys"] and changes(e)]
    assert candidates, "no embedded image's maps change their mask between t = 0.05 and 0.5"
    image = candidates[0]
    entry = entries[image]
    maps = decoded(entry)
    palette = np.asarray(payload["palette"], np.uint8)
    shown = []
    for threshold in (0.05, 0.5):
        result = show_mask(page, method, threshold, image)
        assert float(result["threshold"]) == threshold and result["readout"] == f"{threshold:.2f}"
        rgba = np.frombuffer(base64.b64decode(result["rgba"]), np.uint8).reshape(result["height"], result["width"], 4)
        expected = palette[pseudo_mask(np.asarray(entry["keys"]), maps, threshold)]
        assert (rgba[..., :3] == expected).all(), f"mask at t={threshold} differs from the rule"
        shown.append(rgba)
    assert not np.array_equal(*shown), "moving the threshold did not change the mask"


# ------------------------------------------------------------------------------------------------ tests

def test_demo_report_in_the_browser(browser: DevTools, quick_demo: Path) -> None:
    html_path = quick_demo / "report.html"
    assert html_path.stat().st_size < MAX_HTML_BYTES
    summary = json.loads((quick_demo / "report.json").read_text())
    page = Page(browser, html_path)
    assert_page_is_clean(page)
    checked = assert_tables_show_json(page, summary)
    methods = len(summary["methods"])
    assert checked >= methods * 9 + (methods + 1) * 21  # main table rows + the per-class table
    payload = explorer_payload(html_path.read_text(), "demo")
    names = [m["name"] for m in payload["methods"]]
    assert names[:methods] == list(summary["methods"]) and "centre prior" in names
    for m in payload["methods"]:
        for entry in m["maps"]:
            assert entry["height"] <= 64 and entry["width"] <= 64
    assert_mask_follows_the_rule(page, payload, names.index("mmcst"))
    # The chart marks the chosen threshold: its vertical line moves with the control.
    before = page.evaluate("document.querySelector('.chart .now').getAttribute('x1')")
    show_mask(page, 0, 0.9, 0)
    assert page.evaluate("document.querySelector('.chart .now').getAttribute('x1')") != before
    show_mask(page, 0, summary["methods"][names[0]]["best_threshold"], 0)
    assert page.problems() == []
    page.screenshot(quick_demo / "report.png")
    assert (quick_demo / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_report_in_the_browser(browser: DevTools, quick_demo: Path) -> None:
    """``X.html`` beside ``X.json``: one method, tables keyed into X.json, its own mask explorer."""
    html_path = quick_demo / "runs" / "mmcst" / "eval" / "val.html"
    result = json.loads(html_path.with_suffix(".json").read_text())
    page = Page(browser, html_path)
    assert_page_is_clean(page)
    assert assert_tables_show_json(page, result) == 2 * 2 + 3 * 21
    payload = explorer_payload(html_path.read_text(), "eval")
    assert len(payload["methods"]) == 1
    assert_mask_follows_the_rule(page, payload, 0)
    show_mask(page, 0, result["best"]["threshold"], 0)
    assert page.problems() == []
    page.screenshot(html_path.with_suffix(".png"))
