"""A program at the other end of a serial line: waits for text, answers prompts, keeps a log.

try-image drives an emulated board through its serial console the way a person on a cable
would. Everything the guest writes goes to a log file as it arrives (the log is what a failed
run shows); matching happens on a cleaned copy: terminal escape sequences, carriage returns
and bytes that are not text removed, because systemd's status lines and a line with noise on
it must not hide a prompt.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Escape sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), and the short ones
# (ESC 7, ESC c, ESC ( B ...: any final byte but the [ and ] that open the long ones); then
# control characters except newline and tab.
_SEQUENCE = rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[ -/]*[0-Z\\^-~]"
_SEQUENCES = re.compile(_SEQUENCE)
_ESCAPES = re.compile(_SEQUENCE + rb"|[\x00-\x08\x0b-\x1f\x7f]")
# A sequence still open after this many bytes is noise, not a sequence: let it through.
_LONGEST_SEQUENCE = 64
# How much cleaned text is kept to match against: prompts are short; a boot log is not.
_WINDOW = 256 << 10


class ConsoleError(Exception):
    """The guest did not say what was expected: the phase, what was awaited, and why."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"{phase}: {message}")
        self.phase = phase


class ConsoleTimeout(ConsoleError):
    pass


class ConsoleClosed(ConsoleError):
    pass


class GuestFailed(ConsoleError):
    """The guest printed something that means it cannot get further (a kernel panic)."""


@dataclass(frozen=True)
class Match:
    name: str
    text: str               # the matched text
    groups: tuple[str, ...]
    at: float               # monotonic time of the match


# Lines after which waiting longer is pointless, with what they usually mean.
FATAL: dict[str, str] = {
    r"Kernel panic - not syncing[^\n]*": "the kernel panicked",
    r"Gave up waiting for root file ?system device[^\n]*":
        "the kernel did not find the root filesystem (is its disk driver in the initrd?)",
    r"ALERT! [^\n]* does not exist[^\n]*":
        "the initrd did not find the root filesystem (root= on the kernel command line)",
    r"Wrong Image Format for bootm command|Bad Linux ARM zImage magic|"
    r"Retrieving file: [^\n]*\n[^\n]*(?:Failed to load|not found)[^\n]*":
        "U-Boot could not load the kernel",
}


class SerialConsole:
    """One serial line, as a file descriptor (a socket QEMU serves, or a pty in tests).

    A thread reads the line all the time, not only while something is awaited: a guest whose
    console output nobody reads stalls (QEMU stops taking bytes from the emulated UART, and
    the kernel and systemd block writing to the console), which would turn a slow check on the
    host side, an HTTP poll, into a hung boot."""

    def __init__(self, fd: int, log: BinaryIO, *, fatal: Mapping[str, str] | None = None,
                 echo: BinaryIO | None = None) -> None:
        self.fd = fd
        self.log = log
        self.echo = echo
        self.fatal = {re.compile(k): v for k, v in (FATAL if fatal is None else fatal).items()}
        self._text = ""          # cleaned text not yet consumed by a match
        self._closed = False
        self._stopping = False
        self._last_data = time.monotonic()
        self._pending = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._changed = threading.Condition()
        os.set_blocking(fd, False)
        self._reader = threading.Thread(target=self._read_forever, name="serial-reader",
                                        daemon=True)
        self._reader.start()

    def close(self) -> None:
        """Stop reading (the fd stays open: it belongs to the caller)."""
        self._stopping = True
        self._reader.join(timeout=5)

    def __enter__(self) -> SerialConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Reading.

    def _read_forever(self) -> None:
        try:
            self._read_until_closed()
        finally:
            # Whatever stopped the reader (the line closed, the log's disk full), waiting
            # for more text would only run into a time limit.
            with self._changed:
                self._closed = True
                self._changed.notify_all()

    def _read_until_closed(self) -> None:
        while not self._stopping:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:         # a pty whose other end closed reads EIO
                data = b""
            if not data:
                return
            self.log.write(data)
            self.log.flush()
            if self.echo is not None:
                self.echo.write(data)
                self.echo.flush()
            clean = self._clean(data)
            with self._changed:
                self._text = (self._text + clean)[-_WINDOW:]
                self._last_data = time.monotonic()
                self._changed.notify_all()

    def _clean(self, data: bytes) -> str:
        """Text without escapes; a sequence or a UTF-8 character cut between two reads is
        kept back until its end arrives, so it is neither half-removed nor garbled."""
        data = self._pending + data
        self._pending = b""
        cut = data.rfind(b"\x1b")
        if cut >= 0 and len(data) - cut < _LONGEST_SEQUENCE and not _SEQUENCES.match(data, cut):
            data, self._pending = data[:cut], data[cut:]
        return self._decoder.decode(_ESCAPES.sub(b"", data)).replace("\ufffd", "")

    def expect(self, patterns: Mapping[str, str], timeout: float, phase: str) -> Match:
        """Wait for the first of `patterns` (name → regular expression) to appear; text up to
        the end of the match is consumed. Raises ConsoleTimeout, ConsoleClosed, GuestFailed."""
        compiled = {name: re.compile(p) for name, p in patterns.items()}
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [(m.start(), name, m) for name, rx in compiled.items()
                         if (m := rx.search(self._text))]
                if found:
                    _, name, m = min(found, key=lambda f: f[0])
                    self._text = self._text[m.end():]
                    return Match(name, m.group(0), tuple(g or "" for g in m.groups()),
                                 time.monotonic())
                for rx, meaning in self.fatal.items():
                    # Once the line is complete: the message names the cause, which follows.
                    m = rx.search(self._text)
                    if m and (m.end() < len(self._text) or self._closed):
                        raise GuestFailed(phase, f"{meaning}: {m.group(0).strip()!r}")
                if self._closed:
                    raise ConsoleClosed(phase, f"the serial line closed while waiting for "
                                               f"{_describe(patterns)} (did QEMU stop?)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleTimeout(phase, f"no {_describe(patterns)} on the serial "
                                                f"console in {timeout:.0f} s")
                self._changed.wait(min(left, 1.0))

    def wait_quiet(self, seconds: float, limit: float = 60) -> None:
        """Return once the line has been silent for `seconds` (at most after `limit`): used
        before typing into a shell, so the answer is not mixed with late boot messages."""
        end = time.monotonic() + limit
        while time.monotonic() < end and not self._closed:
            silent = time.monotonic() - self._last_data
            if silent >= seconds:
                return
            time.sleep(min(seconds - silent, 0.5))

    def forget(self) -> None:
        """Drop the text read so far from matching (it stays in the log)."""
        with self._changed:
            self._text = ""

    def drain(self, seconds: float) -> None:
        """Let the reader log `seconds` more of the guest's output (its last words)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._closed:
            time.sleep(0.1)

    # Writing.

    def send(self, text: str) -> None:
        """Type `text`, a few characters at a time as a person would: a getty that has just
        opened the line may flush a burst that arrived before it set the line up."""
        data = text.encode()
        for i in range(0, len(data), 16):
            self._write(data[i:i + 16])
            time.sleep(0.02)

    def _write(self, data: bytes) -> None:
        deadline = time.monotonic() + 10
        while data:
            try:
                written = os.write(self.fd, data)
                data = data[written:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConsoleError("serial", "the guest does not read its serial "
                                                 "console") from None
                select.select([], [self.fd], [], 0.5)


def _describe(patterns: Mapping[str, str]) -> str:
    return " or ".join(repr(name) for name in patterns)


def tail(path: Path, lines: int = 50) -> str:
    """The last lines of a serial log, cleaned of escape sequences, for an error report."""
    try:
        data = path.read_bytes()[-(256 << 10):]
    except OSError:
        return ""
    text = _ESCAPES.sub(b"", data.replace(b"\r\n", b"\n")).decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
