"""HTTP for the builder: small files (index, .sha, .asc) and large resumable downloads.

Both retry connection failures and 5xx answers with back-off. A large download keeps what it
has in a `.part` file and asks for the rest with an HTTP Range request, guarded by If-Range so
that a file changed on the server is fetched anew rather than spliced onto the old part.
"""

from __future__ import annotations

import errno
import json
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests

from builder import __version__, log
from builder.errors import BuildError

USER_AGENT = f"orangepi-jupyter/{__version__} (build-image)"
# Small enough that a dropped connection loses little: the bytes of the read in progress when
# it breaks are gone, and the resume starts after the last whole chunk.
CHUNK = 64 << 10
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Failures to connect that another attempt will not fix.
PERMANENT = ("Name or service not known", "No address associated with hostname")

T = TypeVar("T")


class _Retry(Exception):
    """A failure worth another attempt (the connection, not the request, was at fault).

    `progressed`: the attempt received data before it failed. A long download over a flaky
    link may lose its connection many times; only attempts that got nowhere use up retries.
    """

    def __init__(self, reason: str, progressed: bool = False) -> None:
        super().__init__(reason)
        self.progressed = progressed


class HttpError(BuildError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def disk_full_error(path: Path, exc: OSError) -> BuildError:
    return BuildError(
        f"no space left on device while writing {path}: free some space there or point "
        f"--cache-dir at a larger disk ({exc.strerror})"
    )


class Http:
    def __init__(self, *, timeout: float, retries: int, backoff: float = 1.0) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def close(self) -> None:
        self.session.close()

    def _attempts(self, what: str, attempt: Callable[[], T]) -> T:
        """Call `attempt` until it succeeds, fails for good, or `retries` attempts in a row
        got nowhere."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Retry as exc:
                failures = 1 if exc.progressed else failures + 1
                if failures > self.retries:
                    raise BuildError(
                        f"could not download {what} after {failures} "
                        f"attempt{'s' if failures > 1 else ''} ({exc}): "
                        f"check the network or the mirror, then rerun (a download resumes)"
                    ) from None
                delay = min(self.backoff * 2 ** (failures - 1), 30.0)
                log.warn(f"{what}: {exc}; retrying in {delay:g} s "
                         f"(attempt {failures + 1} of {self.retries + 1})")
                time.sleep(delay)

    def _get(self, url: str, what: str, headers: dict[str, str] | None = None,
             allow: tuple[int, ...] = ()) -> requests.Response:
        try:
            response = self.session.get(
                url, stream=True, timeout=(self.timeout, self.timeout), headers=headers or {}
            )
        except requests.exceptions.SSLError as exc:
            raise BuildError(
                f"{what}: TLS check of {_host(url)} failed ({_reason(exc)}): behind an "
                f"intercepting proxy, point REQUESTS_CA_BUNDLE at its CA certificate") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            reason = _reason(exc)
            if reason in PERMANENT:
                raise BuildError(f"{what}: {reason} for {_host(url)}: check the URL, DNS or "
                                 f"proxy settings") from None
            raise _Retry(reason) from None
        except requests.RequestException as exc:
            # Too many redirects, a scheme requests cannot speak, a malformed URL: trying again
            # changes nothing.
            raise BuildError(f"{what}: {_reason(exc)} ({url})") from None
        if response.status_code in RETRY_STATUS:
            response.close()
            raise _Retry(f"HTTP {response.status_code} from {_host(url)}")
        if response.status_code >= 400 and response.status_code not in allow:
            response.close()
            raise HttpError(
                f"{what} is not available: HTTP {response.status_code} for {url}",
                response.status_code,
            )
        return response

    def get_bytes(self, url: str, what: str, limit: int = 64 << 20) -> bytes:
        """A small file, whole, in memory (an index, a checksum, a signature)."""

        def attempt() -> bytes:
            with self._get(url, what) as response:
                try:
                    data = bytearray()
                    for chunk in response.iter_content(CHUNK):
                        data += chunk
                        if len(data) > limit:
                            raise BuildError(f"{what} at {url} is larger than {limit} bytes")
                    return bytes(data)
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError) as exc:
                    raise _Retry(_reason(exc)) from None

        return self._attempts(what, attempt)

    def download(self, url: str, part: Path, what: str) -> None:
        """Download url into `part`, resuming what an earlier attempt or run left there.

        On success `part` holds the whole file. On failure or interruption it keeps what
        arrived, for the next run to resume; only a full disk removes it. The caller ends the
        part's life with forget_partial() once it has checked and moved the file: until then
        a rerun can resume (or, for a complete part, skip) the download.
        """
        state = _PartState(part, url)

        def attempt() -> None:
            offset = state.resume_offset()
            # The bytes on disk must be the bytes on the server: no transparent gzip, whose
            # decoded length would not match the Range offsets.
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if state.validator:
                    headers["If-Range"] = state.validator
            # 416 answers a Range past the end: the part may already be complete.
            with self._get(url, what, headers, allow=(416,) if offset else ()) as response:
                if response.status_code == 206:
                    start, total = _content_range(response.headers.get("Content-Range", ""))
                    if start != offset:
                        state.discard()
                        raise _Retry(f"server resumed at byte {start}, not {offset}")
                    log.info(f"resuming {what} at {log.human_size(offset)}")
                elif response.status_code == 416 and offset:
                    _, total = _content_range(response.headers.get("Content-Range", ""))
                    if total == offset:
                        return  # the part was already complete
                    state.discard()
                    raise _Retry("the partial download no longer matches the server's file")
                else:
                    offset = 0
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                state.remember(response.headers)
                self._receive(response, state, offset, total, what)

        self._attempts(what, attempt)

    def _receive(self, response: requests.Response, state: _PartState, offset: int,
                 total: int | None, what: str) -> None:
        mode = "ab" if offset else "wb"
        start = offset
        try:
            with open(state.part, mode) as out, \
                    log.progress(f"downloading {what}", total, initial=offset) as bar:
                try:
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        offset += len(chunk)
                        bar.update(len(chunk))
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError) as exc:
                    raise _Retry(
                        f"connection lost after {log.human_size(offset)}: {_reason(exc)}",
                        progressed=offset > start,
                    ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                state.discard()
                raise disk_full_error(state.part, exc) from None
            raise
        if total is not None and offset < total:
            raise _Retry(f"connection closed after {offset} of {total} bytes",
                         progressed=offset > start)


class _PartState:
    """A partial download and, beside it, what is needed to resume it safely."""

    def __init__(self, part: Path, url: str) -> None:
        self.part = part
        self.meta = part.with_name(part.name + ".json")
        self.url = url
        self.validator: str | None = None

    def resume_offset(self) -> int:
        try:
            meta = json.loads(self.meta.read_text())
            size = self.part.stat().st_size
        except (OSError, ValueError):
            self.discard()
            return 0
        if meta.get("url") != self.url:
            self.discard()
            return 0
        self.validator = meta.get("validator")
        return size

    def remember(self, headers: requests.structures.CaseInsensitiveDict[str]) -> None:
        # A strong ETag identifies this exact file; Last-Modified is the fallback If-Range
        # accepts. A weak ETag (W/...) must not be used with If-Range.
        etag = headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
        self.validator = validator
        self.meta.write_text(json.dumps({"url": self.url, "validator": validator}))

    def discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
        self.validator = None


def forget_partial(part: Path) -> None:
    """A partial download is finished with (moved into the cache, or found bad)."""
    _PartState(part, "").discard()


def _content_range(value: str) -> tuple[int | None, int | None]:
    """`bytes 100-199/1000` → (100, 1000); `bytes */1000` → (None, 1000)."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _reason(exc: Exception) -> str:
    """The most telling part of a requests/urllib3 exception chain, which nests the cause
    several levels deep."""
    text = str(exc)
    certificate = re.search(r"certificate verify failed: [^'\")(]*", text)
    if certificate:
        return certificate.group(0).strip()
    for marker in ("Connection refused", *PERMANENT, "Temporary failure in name resolution",
                   "timed out", "Connection reset", "IncompleteRead", "Connection broken",
                   "Remote end closed", "Exceeded 30 redirects"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200] if text else type(exc).__name__
