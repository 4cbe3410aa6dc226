"""A local stand-in for Armbian's download mirrors, for tests.

The downloader has to cope with what real mirrors do: redirect to another host,
answer ranged resumes, change a file under a resuming client, fail with 5xx for a
while and drop connections mid-body. ``Mirror`` serves a directory on 127.0.0.1
over real HTTP/1.1 and lets a test script those faults per path, then inspect
exactly what was sent.

Paths in rules and records are URL paths without the query, percent-decoded
(``/dl/orangepi5/archive/Armbian.img.xz``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from socketserver import TCPServer
from types import TracebackType
from typing import Any, BinaryIO, Self
from urllib.parse import unquote, urlsplit

CONNECTION_TIMEOUT = 10.0
"""Seconds a handler waits on a silent or stalled client, so no test can hang on it."""

_CHUNK = 64 * 1024
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


@dataclass
class Served:
    """One request the mirror answered; recorded before the body so tests never race it."""

    method: str
    path: str
    range: str | None
    if_range: str | None
    status: int
    body_bytes: int


class _Unsatisfiable(Exception):
    """The Range header is valid but lies wholly past the end of the file (416)."""


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the ``[start, end)`` slice a single-range header asks for.

    None means "ignore the header and send everything", which RFC 9110 allows for
    syntax we do not support (multiple ranges, other units, last < first).
    """
    match = _RANGE.fullmatch(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix form "bytes=-N": the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _Unsatisfiable
    end = min(int(last) + 1, size) if last else size
    return start, end


def _if_range_holds(value: str | None, etag: str, mtime: float) -> bool:
    """Whether a Range may be honoured: no If-Range, or one naming the current file.

    ETags compare strongly (a weak tag never matches); dates must equal the
    Last-Modified second. Anything else means the client's partial copy is stale.
    """
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    try:
        date = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return int(date.timestamp()) == int(mtime)


def _open(path: Path | None) -> BinaryIO | None:
    """Open for reading, treating a file that vanished since the lookup as missing."""
    if path is None:
        return None
    try:
        return path.open("rb")
    except OSError:
        return None


def _content_type(path: Path) -> str:
    """Armbian serves images and signatures as opaque bytes, metadata as JSON."""
    return "application/json" if path.suffix == ".json" else "application/octet-stream"


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection; every decision about faults is delegated to the Mirror."""

    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_TIMEOUT  # applied to the accepted socket by StreamRequestHandler

    @property
    def mirror(self) -> Mirror:
        assert isinstance(self.server, _Server)
        return self.server.mirror

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean; ``Mirror.requests`` is the log."""

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _serve(self) -> None:
        mirror = self.mirror
        record = Served(
            method=self.command,
            path=unquote(urlsplit(self.path).path),
            range=self.headers.get("Range"),
            if_range=self.headers.get("If-Range"),
            status=0,
            body_bytes=0,
        )
        failure = mirror._take(mirror._failures, record.path)
        if failure is not None:
            self._send_short(record, failure, f"injected failure: HTTP {failure}\n".encode())
            return
        redirect = mirror._redirect_for(record.path)
        if redirect is not None:
            status, target = redirect
            self._send_short(record, status, b"", {"Location": target})
            return
        path = mirror._file_for(record.path)
        file = _open(path)
        if path is None or file is None:
            self._send_short(record, 404, b"not found\n")
            return
        with file:
            self._send_file(record, path, file)

    def _send_file(self, record: Served, path: Path, file: BinaryIO) -> None:
        """Answer 200, 206 or 416, judged on the open file so a concurrent edit is consistent."""
        stat = os.fstat(file.fileno())
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        headers = {
            "Content-Type": _content_type(path),
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        }
        span = None
        if record.range is not None and _if_range_holds(record.if_range, etag, stat.st_mtime):
            try:
                span = _byte_range(record.range, size)
            except _Unsatisfiable:
                headers["Content-Range"] = f"bytes */{size}"
                self._send_short(record, 416, b"", headers)
                return
        if span is None:
            status, start, end = 200, 0, size
        else:
            (start, end), status = span, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        self._send_head(record, status, headers)
        if self.command == "GET":
            self._send_body(record, file, start, end)

    def _send_short(
        self, record: Served, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer with a small in-memory body, keeping the connection reusable."""
        self._send_head(
            record,
            status,
            {"Content-Type": "text/plain", **(headers or {}), "Content-Length": str(len(body))},
        )
        if self.command == "GET" and body:
            try:
                self._write(record, body)
            except OSError:
                self._hang_up()

    def _send_head(self, record: Served, status: int, headers: Mapping[str, str]) -> None:
        record.status = status
        self.mirror._record(record)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_body(self, record: Served, file: BinaryIO, start: int, end: int) -> None:
        """Stream ``[start, end)``, applying any drop_after cut and throttle for the path."""
        mirror = self.mirror
        cut = mirror._take(mirror._drops, record.path)
        stop = end if cut is None else min(end, start + cut)
        rate = mirror._rate_for(record.path)
        chunk_size = _CHUNK if rate is None else max(1, min(_CHUNK, rate // 20))
        file.seek(start)
        try:
            while (remaining := stop - file.tell()) > 0:
                chunk = file.read(min(chunk_size, remaining))
                if not chunk:  # the file shrank under us; the client sees a short body
                    break
                self._write(record, chunk)
                if rate is not None and mirror._closing.wait(len(chunk) / rate):
                    raise ConnectionAbortedError("mirror is shutting down")
        except OSError:
            self._hang_up()
            return
        if cut is not None:
            self._hang_up()

    def _write(self, record: Served, data: bytes) -> None:
        """Count before sending so a client that has the bytes never sees a stale count."""
        record.body_bytes += len(data)
        try:
            self.wfile.write(data)
        except OSError:
            record.body_bytes -= len(data)
            raise

    def _hang_up(self) -> None:
        """Close for real (FIN now, no keep-alive) so the client notices a truncated body."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    """Loopback-only threaded server that remembers its live connections for shutdown."""

    daemon_threads = True

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        """Skip HTTPServer's reverse-DNS lookup of the address, which can stall for seconds."""
        TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = host, port

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if isinstance(request, socket.socket):
            with self._connections_lock:
                self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        """Clients vanishing mid-request is the point of these tests; real bugs still print."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        """Wake handlers parked on keep-alive reads so they end now, not after the timeout."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class Mirror:
    """Context manager: `with Mirror(root) as m:` serves files under `root` (a pathlib.Path)
    on 127.0.0.1, random free port.

    A request path maps to ``root / path.lstrip('/')``; missing files and directories
    are 404. Fault rules (``fail``, ``redirect``, ``drop_after``, ``throttle``) may be
    set before or inside the ``with`` block and apply to GET and HEAD; ``fail`` wins
    over ``redirect``, which wins over serving the file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = ""
        self.requests: list[Served] = []
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, int]] = {}  # path -> (status, times left)
        self._drops: dict[str, tuple[int, int]] = {}  # path -> (nbytes, times left)
        self._redirects: dict[str, tuple[int, str]] = {}  # path -> (status, Location)
        self._throttles: dict[str, int] = {}  # path -> bytes per second
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._closing.clear()
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mirror-{self._server.server_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        self._closing.set()  # ends throttled sends promptly
        server.shutdown()
        server.drop_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # -- fault injection -------------------------------------------------------

    def redirect(self, path: str, target: str, status: int = 302) -> None:
        """GET/HEAD of ``path`` answer ``status`` with ``Location: target``, like the
        Armbian redirector sending clients to a regional mirror. Stays until replaced."""
        with self._lock:
            self._redirects[path] = (status, target)

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of ``path`` send full headers but only ``nbytes`` of
        body, then shut the socket, so the client sees a truncated transfer."""
        _check_times(times)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            self._drops[path] = (nbytes, times)

    def throttle(self, path: str, bytes_per_second: int) -> None:
        """Send bodies of ``path`` slowly so a test can interrupt a client mid-download.

        ``bytes_per_second=0`` lifts the limit, e.g. before testing the resume.
        Takes effect for bodies started after the call.
        """
        if bytes_per_second < 0:
            raise ValueError(f"bytes_per_second must be >= 0, got {bytes_per_second}")
        with self._lock:
            if bytes_per_second:
                self._throttles[path] = bytes_per_second
            else:
                self._throttles.pop(path, None)

    def fail(self, path: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests of ``path`` (GET or HEAD) answer ``status`` with a
        short text body, like an overloaded mirror's 503."""
        _check_times(times)
        with self._lock:
            self._failures[path] = (status, times)

    # -- inspection -------------------------------------------------------------

    def bytes_served(self, path: str) -> int:
        """Body bytes written for GETs of ``path``, error bodies included; the figure
        that shows whether a resume re-downloaded what the client already had."""
        return sum(s.body_bytes for s in self.hits(path) if s.method == "GET")

    def hits(self, path: str) -> list[Served]:
        """Requests of ``path`` in arrival order (a snapshot)."""
        with self._lock:
            return [s for s in self.requests if s.path == path]

    # -- used by the handler ------------------------------------------------------

    def _record(self, served: Served) -> None:
        with self._lock:
            self.requests.append(served)

    def _take(self, rules: dict[str, tuple[int, int]], path: str) -> int | None:
        """Use up one application of a counted rule; its value, or None if none is armed."""
        with self._lock:
            rule = rules.get(path)
            if rule is None:
                return None
            value, left = rule
            if left > 1:
                rules[path] = (value, left - 1)
            else:
                del rules[path]
            return value

    def _redirect_for(self, path: str) -> tuple[int, str] | None:
        with self._lock:
            return self._redirects.get(path)

    def _rate_for(self, path: str) -> int | None:
        with self._lock:
            return self._throttles.get(path)

    def _file_for(self, path: str) -> Path | None:
        """The regular file a URL path names, refusing ``..`` so nothing leaks from root."""
        relative = path.lstrip("/")
        if not relative or ".." in PurePosixPath(relative).parts:
            return None
        candidate = self.root / relative
        return candidate if candidate.is_file() else None


def _check_times(times: int) -> None:
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
