"""The browser check: headless Chromium opens JupyterLab with a token and takes a screenshot.

An HTTP answer from Jupyter proves little about what a person sees: the page is put together by
JavaScript in the browser, so a broken extension, a missing static file or a wrong token only
shows in a real browser. Chromium is driven over the Chrome DevTools Protocol (CDP) with a
small client below, so the check needs nothing but Debian's chromium package and
websocket-client.

Over HTTPS Chromium trusts only the pinned certificate (builder.pinning.Pin): its public key
goes to --ignore-certificate-errors-spki-list, which forgives a certificate error only for a
certificate with that key, so any other certificate is still refused (never
--ignore-certificate-errors). Where the card has a .local name, that name is mapped to the
forwarded port's address and the page opened by it, so the name matches the certificate too.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
import websocket

from builder.pinning import Pin
from builder.run import die_with_parent, host_env

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
INSTALL_HINT = "install it with: apt-get install chromium"

CHROMIUM_FLAGS = (
    "--headless",
    # As root Chromium exits at once without this ("Running as root without --no-sandbox is
    # not supported"); the page is our own Jupyter server, not the open web.
    "--no-sandbox",
    "--disable-gpu",
    # Docker gives /dev/shm 64 MB, too small for a renderer: Chromium then crashes tabs.
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-breakpad",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--hide-scrollbars",
    # The port is chosen by Chromium and written to DevToolsActivePort, so two checks at once
    # (or a port already taken) cannot collide.
    "--remote-debugging-port=0",
    "--window-size=1280,800",
)

# For DevToolsActivePort and the page list. Start-up takes about a second on an idle machine;
# on a 2-core CI machine busy with QEMU it can take far longer, so the wait is generous.
DEVTOOLS_WAIT = 60.0
# A login page that has finished loading does not change by itself: waiting the full timeout
# would only delay the "wrong token?" answer.
LOGIN_SETTLE = 3.0
# After the shell is there, the launcher and file browser fill in; the screenshot is better
# with them, but the check has already passed, so this wait is short. The launcher comes a
# moment after the file list, and not at all in a workspace that has other tabs open.
CONTENT_WAIT = 30.0
LAUNCHER_WAIT = 5.0
POLL = 0.5
# The longest one DevTools command may take before the page counts as not answering.
EVALUATE_WAIT = 10.0
STOP_GRACE = 10.0

SHELL_SELECTOR = "#jp-main-dock-panel, .jp-LabShell"
LISTING_SELECTOR = ".jp-DirListing"
LAUNCHER_SELECTOR = ".jp-Launcher"
PAGE_STATE = f"""(() => ({{
    href: location.href,
    path: location.pathname,
    title: document.title,
    readyState: document.readyState,
    shell: document.querySelector({json.dumps(SHELL_SELECTOR)}) !== null,
    listing: document.querySelector({json.dumps(LISTING_SELECTOR)}) !== null,
    launcher: document.querySelector({json.dumps(LAUNCHER_SELECTOR)}) !== null,
    settled: document.querySelector('#jupyterlab-splash') === null
        && (!document.fonts || document.fonts.status === 'loaded'),
}}))()"""


@dataclass(frozen=True)
class BrowserCheck:
    title: str
    seconds: float
    screenshot: Path
    url: str            # where JupyterLab was opened, without the token


class BrowserError(Exception):
    """The check failed: the one-line message names the problem and what to do."""


class _CdpError(Exception):
    """Chromium answered a command with an error (e.g. the page navigated mid-evaluation)."""


class _CdpTimeout(Exception):
    pass


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def _resolve_chromium(chromium: str | None) -> str:
    if chromium is None:
        found = find_chromium()
        if found is None:
            raise BrowserError(f"chromium not found: {INSTALL_HINT}")
        return found
    found = shutil.which(chromium)
    if found is None:
        raise BrowserError(f"chromium not found at {chromium}: {INSTALL_HINT}")
    return found


class _Cdp:
    """Just enough of the DevTools protocol: numbered commands, replies matched by id.

    Events are dropped (no domain is enabled, so there are few). Replies to commands nobody is
    waiting for yet are kept, so a slow command (Page.navigate) can run while others poll.
    """

    def __init__(self, url: str, timeout: float) -> None:
        # Chromium refuses DevTools websockets whose Origin header it does not allow;
        # without the header it accepts, and no --remote-allow-origins is needed.
        self._ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        self._ws.send(json.dumps(message))
        return self._next_id

    def reply(self, command_id: int) -> dict[str, Any] | None:
        """The reply to command_id if it has already arrived, without waiting."""
        return self._replies.pop(command_id, None)

    def wait(self, command_id: int, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while command_id not in self._replies:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise _CdpTimeout
            self._ws.settimeout(remaining)
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                raise _CdpTimeout from None
            message = json.loads(raw)
            if isinstance(message, dict) and isinstance(message.get("id"), int):
                self._replies[message["id"]] = message
        message = self._replies.pop(command_id)
        if "error" in message:
            error = message["error"]
            raise _CdpError(error.get("message", str(error)) if isinstance(error, dict) else error)
        result = message.get("result", {})
        return result if isinstance(result, dict) else {}

    def call(self, method: str, params: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        return self.wait(self.send(method, params), timeout)


def _redact(text: str, token: str) -> str:
    if not token:
        return text
    return text.replace(quote(token, safe=""), "<token>").replace(token, "<token>")


def _pin_flags(pin: Pin | None, address: str) -> list[str]:
    """Chromium's flags for trusting the pinned certificate alone; the .local name resolves
    to `address` (the forwarded port's) and nothing else changes in its resolver."""
    if pin is None:
        return []
    # Chromium honours the SPKI list only with a --user-data-dir, which _start always gives.
    flags = [f"--ignore-certificate-errors-spki-list={pin.spki_sha256()}"]
    if pin.hostname:
        flags.append(f"--host-resolver-rules=MAP {pin.hostname} {address}")
    return flags


def _start(program: str, profile: Path, log_path: Path,
           extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    env = host_env()
    # Chromium keeps certificates, caches and crash reports under $HOME and the XDG dirs as
    # well as in --user-data-dir; pointing them into the profile leaves nothing behind.
    # (Not $TMPDIR: its singleton socket must have a path shorter than 108 bytes.)
    for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"),
                     ("XDG_CACHE_HOME", "cache"), ("XDG_DATA_HOME", "data")):
        path = profile / sub
        path.mkdir()
        env[var] = str(path)
    argv = [program, *CHROMIUM_FLAGS, *extra, f"--user-data-dir={profile / 'chromium'}",
            "about:blank"]
    with log_path.open("wb") as log:
        # Its own session, so the renderers and zygotes it forks can be signalled as a group
        # and a Ctrl-C in the terminal reaches us, not Chromium, first.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent())


def _stop(process: subprocess.Popen[bytes], profile: Path) -> None:
    def signal_group(signum: int) -> None:
        # The group id is Chromium's pid, still ours while it is unreaped.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)

    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            process.wait()
    # Helpers that outlived the browser (they notice its death only at their next read).
    signal_group(signal.SIGKILL)
    _reap_helpers(profile)


def _reap_helpers(profile: Path, timeout: float = 5.0) -> None:
    """Wait until no process of this Chromium is left, killing what still runs. Its crash
    handler leaves the process group, and a helper signalled a moment ago may still be
    there: each one carries the HOME this Chromium was given, inside its own profile."""
    mark = f"HOME={profile / 'home'}".encode() + b"\0"
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if mark in (proc / "environ").read_bytes():
                    left.append(int(proc.name))
            except OSError:
                continue        # gone meanwhile, or not ours to read
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_singleton_dir(user_data_dir: Path) -> None:
    """Chromium's lock socket lives in a dir of its own under $TMPDIR, linked from the
    user-data-dir, and a stopped Chromium leaves it there."""
    try:
        socket_path = Path(os.readlink(user_data_dir / "SingletonSocket"))
    except OSError:
        return
    folder = socket_path.parent
    if not folder.is_absolute() or folder == Path(tempfile.gettempdir()):
        return
    with contextlib.suppress(OSError):
        # Only a dir that holds nothing but Chromium's singleton files is ours to remove.
        if all(entry.name.startswith("Singleton") for entry in folder.iterdir()):
            shutil.rmtree(folder)


def _devtools_port(profile: Path, process: subprocess.Popen[bytes], log_path: Path,
                   deadline: float) -> int:
    port_file = profile / "chromium" / "DevToolsActivePort"
    started = time.monotonic()
    end = min(deadline, started + DEVTOOLS_WAIT)
    while time.monotonic() < end:
        if process.poll() is not None:
            raise BrowserError(f"Chromium exited with status {process.returncode} before it "
                               f"opened its DevTools port: see {log_path}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(port_file.read_text().splitlines()[0])
        time.sleep(0.1)
    # The caller's deadline may be the shorter wait: say the one that passed.
    raise BrowserError(f"Chromium did not open its DevTools port in "
                       f"{time.monotonic() - started:.0f} s: see {log_path}")


def _page_target(port: int, log_path: Path, deadline: float) -> str:
    session = requests.Session()
    # A proxy from the environment must not see requests to Chromium on loopback.
    session.trust_env = False
    end = min(deadline, time.monotonic() + DEVTOOLS_WAIT)
    while True:
        with contextlib.suppress(requests.RequestException, ValueError):
            targets = session.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
            for target in targets:
                if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                    return str(target["webSocketDebuggerUrl"])
        if time.monotonic() >= end:
            raise BrowserError(f"Chromium listed no page on its DevTools port {port}: "
                               f"see {log_path}")
        time.sleep(0.2)


def _until(deadline: float) -> float:
    """How long one command may take so that a deadline is kept, give or take a little."""
    return max(0.5, min(EVALUATE_WAIT, deadline - time.monotonic()))


def _page_state(cdp: _Cdp, timeout: float) -> dict[str, Any] | None:
    """What the page shows now, or None while it is between documents."""
    try:
        result = cdp.call("Runtime.evaluate",
                          {"expression": PAGE_STATE, "returnByValue": True}, timeout)
    except (_CdpError, _CdpTimeout):
        # A page busy running JupyterLab's bundles answers late; the next poll asks again.
        return None
    value = result.get("result", {}).get("value")
    if "exceptionDetails" in result or not isinstance(value, dict):
        return None
    return value


def _screenshot(cdp: _Cdp, path: Path, timeout: float) -> None:
    result = cdp.call("Page.captureScreenshot", {"format": "png"}, timeout)
    path.write_bytes(base64.b64decode(result["data"]))


def _load_lab(cdp: _Cdp, url: str, token: str, timeout: float, deadline: float,
              screenshot: Path) -> dict[str, Any]:
    """Open url and wait until JupyterLab's shell is there; the page state at that moment."""
    shown = _redact(url, token)
    # --window-size is the window, and headless Chromium keeps part of it for browser UI it
    # does not draw; the page itself gets exactly 1280x800 this way.
    cdp.call("Emulation.setDeviceMetricsOverride",
             {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
             EVALUATE_WAIT)
    navigation = cdp.send("Page.navigate", {"url": url})
    navigation_error = ""
    retry_at = 0.0
    state: dict[str, Any] | None = None
    login_since: float | None = None

    def fail(reason: str) -> BrowserError:
        # What the browser showed is the quickest way to see why; failing to take it must
        # not hide the reason.
        with contextlib.suppress(Exception):
            _screenshot(cdp, screenshot, EVALUATE_WAIT)
            reason += f"; its screenshot is {screenshot}"
        return BrowserError(f"JupyterLab did not load{reason}")

    while True:
        now = time.monotonic()
        answer = cdp.reply(navigation) if navigation else None
        if answer is not None:
            navigation = 0
            error = answer.get("result", {}).get("errorText") or answer.get("error", {})
            navigation_error = str(error) if error else ""
            if navigation_error.startswith("net::ERR_CERT"):
                # The card's certificate does not change by itself: no point trying again.
                where = shown.split("?")[0]
                raise fail(f": Chromium refused the server's certificate at {where} "
                           f"({navigation_error}): it is not the pinned one")
            # Jupyter may still be starting (or restarting): try again until the deadline.
            retry_at = now + 2.0
        if not navigation and navigation_error and retry_at <= now < deadline:
            navigation = cdp.send("Page.navigate", {"url": url})
        # While a navigation is pending, Chromium holds evaluations until it commits.
        state = _page_state(cdp, _until(deadline)) or state
        if state is not None:
            path = str(state.get("path", ""))
            if state.get("shell") and (path.endswith("/lab") or "/lab/" in path):
                return state
            if path.endswith("/login") and state.get("readyState") == "complete":
                login_since = login_since or now
                if now - login_since >= LOGIN_SETTLE:
                    href = _redact(str(state.get("href")), token)
                    raise fail(f": Jupyter showed its login page at {href} (wrong token?)")
            else:
                login_since = None
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)

    href = _redact(str(state.get("href")), token) if state else "about:blank"
    if navigation_error:
        raise fail(f" in {timeout:.0f} s: Chromium could not open {shown}: {navigation_error} "
                   "(is Jupyter running and reachable at that address?)")
    if navigation:
        raise fail(f" in {timeout:.0f} s: no answer from {shown} "
                   "(is Jupyter running and reachable at that address?)")
    if href.split("?")[0].endswith("/login"):
        raise fail(f" in {timeout:.0f} s: the page stayed at {href} (wrong token?)")
    raise fail(f" in {timeout:.0f} s: the page stayed at {href} without JupyterLab's shell "
               f"(see {screenshot.with_name(screenshot.stem + '.chromium.log')})")


def _wait_for_content(cdp: _Cdp, end: float) -> None:
    listing_since: float | None = None
    while True:
        now = time.monotonic()
        state = _page_state(cdp, _until(end)) or {}
        if state.get("settled") and (state.get("listing") or state.get("launcher")):
            if state.get("launcher"):
                return
            listing_since = listing_since or now
            if now - listing_since >= LAUNCHER_WAIT:
                return
        if now >= end:
            return
        time.sleep(POLL)


def lab_base(base_url: str, pin: Pin | None) -> str:
    """Where Chromium opens JupyterLab: by the card's .local name when it has one (mapped to
    base_url's address), else base_url itself."""
    if pin is None or not pin.hostname:
        return base_url.rstrip("/")
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{pin.hostname}:{parts.port}"


def check_jupyterlab(base_url: str, token: str, screenshot: Path, *, timeout: float = 300,
                     chromium: str | None = None, pin: Pin | None = None) -> BrowserCheck:
    """Open {base_url}/lab?token={token} in headless Chromium, wait for JupyterLab's shell and
    write a PNG screenshot; raises BrowserError with a one-line reason otherwise. With `pin`
    (base_url https://...) only that certificate is trusted, at the card's .local name."""
    program = _resolve_chromium(chromium)
    started = time.monotonic()
    deadline = started + timeout
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    log_path = screenshot.with_name(f"{screenshot.stem}.chromium.log")
    url = f"{lab_base(base_url, pin)}/lab?token={quote(token, safe='')}"
    profile = Path(tempfile.mkdtemp(prefix="orangepi-jupyter-chromium-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        process = _start(program, profile, log_path,
                         _pin_flags(pin, urlsplit(base_url).hostname or "127.0.0.1"))
        port = _devtools_port(profile, process, log_path, deadline)
        target = _page_target(port, log_path, deadline)
        try:
            cdp = _Cdp(target, timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        except (websocket.WebSocketException, OSError) as error:
            raise BrowserError(f"cannot connect to Chromium's DevTools at {target}: {error}; "
                               f"see {log_path}") from None
        try:
            _load_lab(cdp, url, token, timeout, deadline, screenshot)
            _wait_for_content(cdp, min(deadline, time.monotonic() + CONTENT_WAIT))
            seconds = time.monotonic() - started
            # The screenshot is taken even if the deadline has just passed: the shell is there,
            # so the check has passed and the picture only documents it.
            _screenshot(cdp, screenshot, 30.0)
            final = _page_state(cdp, EVALUATE_WAIT) or {}
            return BrowserCheck(title=str(final.get("title", "")), seconds=seconds,
                                screenshot=screenshot, url=_redact(url, token))
        except _CdpTimeout:
            raise BrowserError(f"Chromium stopped answering while loading JupyterLab: "
                               f"see {log_path}") from None
        except (websocket.WebSocketException, OSError, ValueError, KeyError) as error:
            # A crashed renderer or browser shows as a closed socket or a garbled answer.
            raise BrowserError(f"lost the connection to Chromium ({error!r}): "
                               f"see {log_path}") from None
        finally:
            cdp.close()
    finally:
        if process is not None:
            _stop(process, profile)
        _remove_singleton_dir(profile / "chromium")
        shutil.rmtree(profile, ignore_errors=True)
