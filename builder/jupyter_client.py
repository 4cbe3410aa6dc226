"""Jupyter from the outside, as a user's browser talks to it: the login form, the REST API,
and a kernel's websocket. try-image uses it to prove a booted image works.

Over HTTPS (a base of https://...) every request and the websocket trust only the pinned
certificate they are given (builder.pinning.Pin), the card's own: not the system's CAs, and
no request goes out unverified."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
import websocket
from requests.adapters import HTTPAdapter

from builder.pinning import Pin


class _PinnedAdapter(HTTPAdapter):
    """HTTPS whose only trust anchor is the pinned certificate; SNI and the host name check
    use the card's .local name, as the URL's host is the forwarded port on 127.0.0.1."""

    def __init__(self, pin: Pin) -> None:
        self.pin = pin          # before HTTPAdapter's __init__, which makes the pool manager
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs["ssl_context"] = self.pin.context()
        if self.pin.hostname:
            pool_kwargs["server_hostname"] = self.pin.hostname
        else:
            # urllib3 would check the URL's 127.0.0.1 instead: the anchor is exact anyway.
            pool_kwargs["assert_hostname"] = False
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def _session(pin: Pin | None = None) -> requests.Session:
    # The guest is on 127.0.0.1: never through a proxy from the environment, which would
    # also be handed the token and the password (nor a CA bundle from it).
    http = requests.Session()
    http.trust_env = False
    if pin is not None:
        http.mount("https://", _PinnedAdapter(pin))
    return http


def _get(url: str, timeout: float, headers: dict[str, str] | None = None,
         pin: Pin | None = None) -> requests.Response:
    """One request with no cookies from an earlier one: Jupyter answers a token with a login
    cookie, and a "stranger" carrying it would not be one."""
    with _session(pin) as http:
        return http.get(url, timeout=timeout, headers=headers)


class JupyterError(Exception):
    """Jupyter did not do what a user needs: one line saying what."""


@dataclass
class CellResult:
    stdout: str
    seconds: float


def wait_until_up(base: str, timeout: float, alive: Any = None,
                  pin: Pin | None = None) -> float:
    """Seconds until Jupyter answers HTTP at all (any status: 403 is an answer).
    `alive()` returning False (the guest has stopped) ends the wait early; a certificate
    that is not the pinned one ends it at once."""
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        if alive is not None and not alive():
            raise JupyterError(f"the guest stopped before Jupyter answered ({last})")
        try:
            _get(f"{base}/api/status", timeout=10, pin=pin)
            return time.monotonic() - started
        except requests.RequestException as exc:
            # Verification refused the certificate (OpenSSL's reason is all that survives
            # urllib3's wrapping), not a handshake cut short while Jupyter starts: no retry.
            if pin is not None and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise JupyterError(f"Jupyter at {base} presents a certificate other than the "
                                   f"pinned one ({pin.fingerprint})") from None
            last = type(exc).__name__
            time.sleep(3)
    raise JupyterError(f"Jupyter did not answer at {base} in {timeout:.0f} s ({last})")


def refuses_strangers(base: str, pin: Pin | None = None) -> None:
    for path in ("/api/status", "/api/contents", "/api/kernels"):
        answer = _get(f"{base}{path}", timeout=60, pin=pin)
        if answer.status_code not in (401, 403):
            raise JupyterError(f"{path} without credentials answered {answer.status_code}, "
                               f"not 403: Jupyter is open to anyone on the network")


def token_works(base: str, token: str, pin: Pin | None = None) -> None:
    answer = _get(f"{base}/api/status", timeout=60,
                  headers={"Authorization": f"token {token}"}, pin=pin)
    if answer.status_code != 200:
        raise JupyterError(f"the token was refused ({answer.status_code})")


class Session:
    """A browser-like session logged in with the Jupyter password."""

    def __init__(self, base: str, pin: Pin | None = None) -> None:
        self.base = base
        self.pin = pin
        self.http = _session(pin)

    def close(self) -> None:
        self.http.close()

    def login(self, password: str) -> None:
        self.http.get(f"{self.base}/login", timeout=120)
        xsrf = self.http.cookies.get("_xsrf", "")
        answer = self.http.post(f"{self.base}/login", data={"password": password,
                                                            "_xsrf": xsrf},
                                allow_redirects=False, timeout=120)
        if answer.status_code != 302:
            raise JupyterError(f"logging in with the password failed ({answer.status_code})")
        status = self.http.get(f"{self.base}/api/status", timeout=60)
        if status.status_code != 200:
            raise JupyterError(f"logged in, yet /api/status answered {status.status_code}")

    def _headers(self) -> dict[str, str]:
        return {"X-XSRFToken": self.http.cookies.get("_xsrf") or ""}

    def start_kernel(self) -> str:
        answer = self.http.post(f"{self.base}/api/kernels", json={}, headers=self._headers(),
                                timeout=300)
        if answer.status_code != 201:
            raise JupyterError(f"starting a kernel failed ({answer.status_code}: "
                               f"{answer.text[:200]})")
        return str(answer.json()["id"])

    def stop_kernel(self, kernel: str) -> None:
        # Best effort: the guest is shut down next anyway.
        with contextlib.suppress(requests.RequestException):
            self.http.delete(f"{self.base}/api/kernels/{kernel}", headers=self._headers(),
                             timeout=60)

    def execute(self, kernel: str, code: str, timeout: float) -> CellResult:
        """Run one cell over the kernel's websocket, as the notebook page does; its printed
        output, or JupyterError with the traceback's last line."""
        started = time.monotonic()
        url = self.base.replace("http", "ws", 1) + f"/api/kernels/{kernel}/channels"
        cookie = "; ".join(f"{k}={v}" for k, v in self.http.cookies.items())
        session = uuid.uuid4().hex
        # The pinned context as it is: websocket-client uses a given context unchanged.
        sslopt: dict[str, Any] = {}
        if self.pin is not None:
            sslopt = {"context": self.pin.context(), "server_hostname": self.pin.hostname}
        ws = websocket.create_connection(f"{url}?session_id={session}", timeout=60,
                                         http_no_proxy=["127.0.0.1", "localhost"],
                                         sslopt=sslopt,
                                         header=[f"Cookie: {cookie}", *(
                                             f"{k}: {v}" for k, v in self._headers().items())])
        try:
            msg_id = uuid.uuid4().hex
            ws.send(json.dumps(_message("execute_request", msg_id, session, {
                "code": code, "silent": False, "store_history": False,
                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})))
            output: list[str] = []
            replied = idle = False
            while not (replied and idle):
                left = timeout - (time.monotonic() - started)
                if left <= 0:
                    raise JupyterError(f"the cell did not finish in {timeout:.0f} s")
                ws.settimeout(min(left, 60))
                try:
                    # Control frames too: Jupyter pings every 30 s, and websocket-client answers
                    # a ping and waits on inside recv(), so a silent kernel would never let the
                    # limit above be checked.
                    opcode, raw = ws.recv_data(control_frame=True)
                except websocket.WebSocketTimeoutException:
                    continue
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise JupyterError("Jupyter closed the kernel's websocket before the cell "
                                       "finished")
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["header"]["msg_type"], msg.get("content", {})
                if kind == "stream":
                    output.append(content.get("text", ""))
                elif kind == "error":
                    raise JupyterError(f"the cell failed: {content.get('ename')}: "
                                       f"{content.get('evalue')}")
                elif kind == "status" and content.get("execution_state") == "idle":
                    idle = True
                elif kind == "execute_reply":
                    replied = True
                    if content.get("status") != "ok":
                        raise JupyterError(f"the cell failed: {content.get('ename')}: "
                                           f"{content.get('evalue')}")
            return CellResult("".join(output), time.monotonic() - started)
        finally:
            ws.close()


def _message(kind: str, msg_id: str, session: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"header": {"msg_id": msg_id, "username": "try-image", "session": session,
                       "msg_type": kind, "version": "5.3",
                       "date": datetime.now(UTC).isoformat()},
            "parent_header": {}, "metadata": {}, "content": content, "channel": "shell",
            "buffers": []}


# The cell try-image runs: the stack imports, computes things with known answers, and says
# who it runs as and how large the root filesystem is.
STACK_CELL = r'''
import io, json, os, pwd
import matplotlib
matplotlib.use("Agg")
import numpy, scipy, pandas, sympy, geopandas
import matplotlib.pyplot as plt
from scipy import integrate
from shapely.geometry import box
x = sympy.symbols("x")
figure, axes = plt.subplots()
axes.plot(numpy.arange(10) ** 2)
png = io.BytesIO()
figure.savefig(png, format="png")
frame = geopandas.GeoDataFrame({"name": ["a", "b"]}, geometry=[box(0, 0, 2, 3), box(0, 0, 1, 1)])
root = os.statvfs("/")
device = os.stat("/").st_dev
block = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
with open(f"{block}/size") as size:
    partition = int(size.read()) * 512
def start(name):
    with open(f"{name}/start") as f:
        return int(f.read())
disk = os.path.realpath(f"{block}/..")
after = sorted(n for n in os.listdir(disk) if os.path.exists(f"{disk}/{n}/start")
               and start(f"{disk}/{n}") > start(block))
print("TRY-IMAGE " + json.dumps({
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "det": float(numpy.linalg.det(numpy.array([[2.0, 1.0], [1.0, 3.0]]))),
    "quad": integrate.quad(lambda t: t * t, 0, 3)[0],
    "sympy": str(sympy.integrate(x ** 2, (x, 0, 3))),
    "pandas": int(pandas.Series([1, 2, 3, 4]).sum()),
    "area": float(frame.area.sum()),
    "png": png.getvalue()[:4].hex(),
    "root_bytes": root.f_frsize * root.f_blocks,
    "root_partition_bytes": partition,
    "partitions_after_root": after,
    "versions": {m.__name__: m.__version__
                 for m in (numpy, scipy, pandas, matplotlib, sympy, geopandas)},
}))
'''


def check_stack_output(stdout: str) -> dict[str, Any]:
    """The cell's answers, checked; JupyterError names the first wrong one."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("TRY-IMAGE ")), None)
    if line is None:
        raise JupyterError(f"the cell printed no result: {stdout[-300:]!r}")
    got: dict[str, Any] = json.loads(line.removeprefix("TRY-IMAGE "))
    expected = {"det": 5.0, "quad": 9.0, "area": 7.0}
    for key, value in expected.items():
        if abs(float(got[key]) - value) > 1e-6:
            raise JupyterError(f"the stack computed {key} = {got[key]}, not {value}")
    if got["sympy"] != "9" or got["pandas"] != 10:
        raise JupyterError(f"the stack computed sympy {got['sympy']}, pandas {got['pandas']}")
    if got["png"] != "89504e47":
        raise JupyterError("matplotlib did not render a PNG")
    return got
