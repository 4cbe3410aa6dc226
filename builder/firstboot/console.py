"""The console a wizard talks on: a serial line or the screen's tty (or a pipe), set up as a
person types on it, read a line at a time with a timeout, with noise told apart from answers
and hidden input for passwords."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import termios
import threading
import time
import unicodedata
from pathlib import Path


class Garbage(Exception):
    """A line that no keyboard typed: bytes that are not text, or control characters (a
    floating UART receive pin, a wrong baud rate)."""


class AnswerTimeout(Exception):
    """Nobody answered in time."""


def configure_line(fd: int, baud: int | None) -> None:
    """A serial line as a person types on it: cooked, echo, Ctrl-C, CR read as Enter."""
    if not os.isatty(fd):
        return
    attrs = termios.tcgetattr(fd)
    # CR stays CR and ends a line by itself (VEOL), so CR LF is one line end, not two.
    # No XON/XOFF: a stray Ctrl-S from a floating line would freeze our output.
    attrs[0] &= ~(termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[1] |= termios.OPOST | termios.ONLCR
    attrs[3] |= termios.ICANON | termios.ECHO | termios.ECHOE | termios.ISIG
    # Enter (CR) would echo as "^M" after every answer.
    attrs[3] &= ~termios.ECHOCTL
    attrs[6][termios.VEOL] = b"\r"
    # Only Ctrl-C signals: no quit (Ctrl-\) or suspend (Ctrl-Z) from noise.
    attrs[6][termios.VQUIT] = attrs[6][termios.VSUSP] = b"\x00"
    speed = getattr(termios, f"B{baud}", None) if baud else None
    if speed is not None:
        attrs[4] = attrs[5] = speed
    with contextlib.suppress(termios.error):
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


class Console:
    """Line input with a timeout on a terminal (or a pipe), output as text."""

    def __init__(self, fd_in: int, fd_out: int, name: str) -> None:
        self.fd_in, self.fd_out, self.name = fd_in, fd_out, name
        self._buffer = b""
        self._after_cr = False        # a line ended with CR: an LF right after it is its end
        self.is_tty = os.isatty(fd_in)

    def say(self, text: str = "", end: str = "\n") -> None:
        data = (text + end).encode()
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.fd_out, data):]

    def drain(self, limit: float = 10) -> None:
        """Wait, a while at most, until what was written has left the line. When the wizard
        exits, systemd hangs its line up (TTYVHangup), which throws away what the UART has not
        sent yet: the result and the token, written last. (A line that never drains, flow
        control stuck, must not keep the getty away for ever.)"""
        if not os.isatty(self.fd_out):
            return

        def wait() -> None:
            with contextlib.suppress(OSError):
                termios.tcdrain(self.fd_out)

        waiting = threading.Thread(target=wait, daemon=True)
        waiting.start()
        waiting.join(limit)

    def read_line(self, timeout: float | None, hidden: bool = False, prompt: str = "") -> str:
        """One line without its end, after showing `prompt`. Raises AnswerTimeout, EOFError or
        Garbage."""
        saved = None
        if hidden and self.is_tty:
            saved = termios.tcgetattr(self.fd_in)
            quiet = termios.tcgetattr(self.fd_in)
            quiet[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(self.fd_in, termios.TCSANOW, quiet)
        # The prompt only once echo is off: a password sent the moment the prompt shows (a
        # paste, a program at the other end) was seen echoed in clear on a serial console.
        if prompt:
            self.say(prompt, end="")
        try:
            raw = self._read_raw(timeout)
        finally:
            if saved is not None:
                termios.tcsetattr(self.fd_in, termios.TCSANOW, saved)
                self.say()
        if saved is None and self._after_cr and self.is_tty:
            # The terminal's CR was echoed as a bare carriage return (no ECHOCTL "^M"):
            # the next line must not overwrite the answer.
            self.say()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise Garbage from None
        if len(text) > 1024 or any(unicodedata.category(ch)[0] == "C" for ch in text):
            raise Garbage
        return text

    def _read_raw(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Terminals end lines with CR (picocom, screen), LF or CR LF (pyserial's
            # miniterm); the LF of a CR LF may come in a later read than its CR.
            if self._after_cr and self._buffer:
                self._buffer = self._buffer.removeprefix(b"\n")
                self._after_cr = False
            ends = [i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0]
            if ends:
                cut = min(ends)
                line, end = self._buffer[:cut], self._buffer[cut:cut + 1]
                self._buffer = self._buffer[cut + 1:]
                self._after_cr = end == b"\r"
                return line
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise AnswerTimeout
            ready, _, _ = select.select([self.fd_in], [], [], remaining)
            if not ready:
                raise AnswerTimeout
            try:
                chunk = os.read(self.fd_in, 4096)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):   # hung up
                    raise EOFError from None
                raise
            if not chunk:
                if self._buffer:      # a last line without its end
                    line, self._buffer = self._buffer, b""
                    return line
                raise EOFError
            self._buffer += chunk

    def shows_utf8(self, timeout: float = 1.0) -> bool:
        """Whether the terminal on this console draws UTF-8 (a QR code of half blocks needs
        it). The screen's consoles do unless the kernel was told otherwise. A terminal on a
        serial line or over SSH is asked: a two-byte character is written and the terminal
        asked where its cursor is (ESC [ 6 n); one column on means UTF-8. A line where
        nobody answers (no terminal, or one that ignores the question) counts as no."""
        if not (self.is_tty and os.isatty(self.fd_out)):
            return False
        if re.fullmatch(r"tty\d+", self.name):
            with contextlib.suppress(OSError):
                return Path("/sys/module/vt/parameters/default_utf8").read_text().strip() in \
                    ("1", "Y")
            return False
        try:
            saved = termios.tcgetattr(self.fd_in)
        except termios.error:
            return False
        raw = termios.tcgetattr(self.fd_in)
        raw[3] &= ~(termios.ICANON | termios.ECHO)
        answer = b""
        try:
            termios.tcsetattr(self.fd_in, termios.TCSANOW, raw)
            self.say("\r\u00e9\x1b[6n", end="")
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0 and \
                    not re.search(rb"\x1b\[\d+;\d+R", answer):
                ready, _, _ = select.select([self.fd_in], [], [], left)
                if not ready:
                    break
                answer += os.read(self.fd_in, 64)
        except (OSError, termios.error):
            return False
        finally:
            self.say("\r\x1b[K", end="")      # the probe's character off the screen again
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd_in, termios.TCSANOW, saved)
            # An answer that came late must not reach the next prompt (the login's) as typing.
            time.sleep(0.2)
            self.discard_input()
        found = re.search(rb"\x1b\[\d+;(\d+)R", answer)
        return found is not None and int(found.group(1)) == 2

    def discard_input(self) -> None:
        self._buffer = b""
        self._after_cr = False
        if self.is_tty:
            with contextlib.suppress(termios.error):
                termios.tcflush(self.fd_in, termios.TCIFLUSH)

