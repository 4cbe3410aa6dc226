"""SerialConsole against a pseudo-terminal that replays a recorded boot of an Orange Pi PC image.

The recording (tests/data/boot-orangepi-pc.log) is a trimmed, byte-exact copy of a real QEMU
serial log: U-Boot SPL and U-Boot, the kernel, systemd's status lines with their escape
sequences and carriage returns, a hung-task trace, the setup wizard and the login prompt.
A thread plays the guest on the pty's slave end; the console reads the master end.
"""

from __future__ import annotations

import io
import itertools
import os
import random
import re
import select
import threading
import time
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from builder.serial_console import (
    ConsoleClosed,
    ConsoleTimeout,
    GuestFailed,
    Match,
    SerialConsole,
    tail,
)

RECORDING = (Path(__file__).parent / "data" / "boot-orangepi-pc.log").read_bytes()
PROMPT = b"Press Enter to begin setup on this console. "
BANNER = b"=== Jupyter workstation setup"
LOGIN_LINE = b"Debian GNU/Linux 13 pcplus-lab ttyS0"
# The guest up to the end of the prompt (which has no newline: the wizard waits there), and
# what it says once Enter has been pressed.
BEFORE_ENTER = RECORDING[:RECORDING.index(PROMPT) + len(PROMPT)]
AFTER_ENTER = RECORDING[len(BEFORE_ENTER):]
KERNEL_START = RECORDING.index(b"Starting kernel ...\r\n") + len(b"Starting kernel ...\r\n")

# 115200 baud is ~11.5 kB/s; replay a few times faster so that the whole boot takes < 1 s.
BYTES_PER_SECOND = 40_000
WRITE_LIMIT = 10.0          # no single write to the pty may take longer than this


# A chunk the writer plays: bytes are written (then a pause for their time on the line), a float
# is a pause in seconds, an Event is waited for (the guest waiting for a key), "close" hangs up.
Chunk = bytes | float | threading.Event | str


class CountingLog(io.BytesIO):
    """A log that counts its writes: the console writes once per read from the line."""

    writes = 0

    def write(self, data: bytes) -> int:    # type: ignore[override]
        self.writes += 1
        return super().write(data)


class Line:
    """A pty pair with a SerialConsole on the master and a scripted guest on the slave."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)          # no newline translation, no echo
        os.set_blocking(self.slave, False)
        self.log = CountingLog()
        self.echo = io.BytesIO()
        self.console = SerialConsole(self.master, self.log, echo=self.echo)
        self.stop = threading.Event()
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.last_write = 0.0
        self._thread: threading.Thread | None = None
        self._slave_open = True

    # The guest's side.

    def write(self, data: bytes) -> None:
        """Write all of `data` to the slave, bounded in time."""
        deadline = time.monotonic() + WRITE_LIMIT
        view = memoryview(data)
        while view:
            if self.stop.is_set():
                return
            try:
                view = view[os.write(self.slave, view):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("nobody reads the pty's master end") from None
                select.select([], [self.slave], [], 0.05)
        self.last_write = time.monotonic()

    def play(self, chunks: Sequence[Chunk]) -> None:
        """Play `chunks` from a background thread."""
        assert self._thread is None
        self._thread = threading.Thread(target=self._play, args=(list(chunks),), daemon=True)
        self._thread.start()

    def _play(self, chunks: list[Chunk]) -> None:
        try:
            for chunk in chunks:
                if self.stop.is_set():
                    return
                if isinstance(chunk, threading.Event):
                    deadline = time.monotonic() + 5
                    while not chunk.wait(0.05) and not self.stop.is_set():
                        if time.monotonic() > deadline:
                            raise TimeoutError("the test never released the guest")
                elif isinstance(chunk, float):
                    self.stop.wait(chunk)
                elif chunk == "close":
                    self.close_slave()
                else:
                    assert isinstance(chunk, bytes)
                    self.write(chunk)
                    self.stop.wait(len(chunk) / BYTES_PER_SECOND)
        except BaseException as exc:   # reported by finish()
            self.errors.append(exc)
        finally:
            self.done.set()

    def wait_played(self, timeout: float = 10) -> None:
        assert self.done.wait(timeout), "the replay did not finish"

    def wait_logged(self, size: int, timeout: float = 5) -> None:
        """Until the console has read `size` bytes in all."""
        deadline = time.monotonic() + timeout
        while len(self.log.getvalue()) < size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.log.getvalue()) == size

    def close_slave(self) -> None:
        if self._slave_open:
            self._slave_open = False
            os.close(self.slave)

    def read_slave(self, count: int, timeout: float = 3) -> bytes:
        """What the console typed: up to `count` bytes, waiting at most `timeout`."""
        got = b""
        deadline = time.monotonic() + timeout
        while len(got) < count and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.slave], [], [], left)
            if ready:
                got += os.read(self.slave, count - len(got))
        return got

    def finish(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(WRITE_LIMIT + 5)
            assert not self._thread.is_alive(), "the replay thread did not stop"
        self.console.close()            # its reader thread, before the fds go
        reader = getattr(self.console, "_reader", None)
        assert reader is None or not reader.is_alive(), "the console's reader did not stop"
        self.close_slave()
        os.close(self.master)


@pytest.fixture
def line() -> Iterator[Line]:
    pty_line = Line()
    try:
        yield pty_line
    finally:
        pty_line.finish()
    assert not pty_line.errors, f"the replay failed: {pty_line.errors!r}"


def lines_of(data: bytes) -> list[bytes]:
    """`data` cut after each newline, the newline kept (a carriage return is not a cut)."""
    return [part for part in re.split(rb"(?<=\n)", data) if part]


def chunked(data: bytes, seed: int, most: int = 6) -> list[Chunk]:
    """`data` in chunks of 1 to `most` whole lines, the way a guest's writes arrive."""
    rng = random.Random(seed)
    parts = lines_of(data)
    chunks: list[Chunk] = []
    while parts:
        take = rng.randint(1, most)
        chunks.append(b"".join(parts[:take]))
        del parts[:take]
    assert b"".join(c for c in chunks if isinstance(c, bytes)) == data
    return chunks


def bytewise(data: bytes, pause: float = 0.001) -> list[Chunk]:
    chunks: list[Chunk] = []
    for i in range(len(data)):
        chunks += [data[i:i + 1], pause]
    return chunks


# Prompt detection over a whole boot.

def test_boot_replay_finds_each_phase_in_order_and_logs_every_byte(line: Line) -> None:
    enter = threading.Event()
    line.play([*chunked(BEFORE_ENTER, seed=1), enter, *chunked(AFTER_ENTER, seed=2)])
    console = line.console
    started = time.monotonic()
    seen: list[Match] = []
    for phase, patterns in [
        ("u-boot", {"spl": r"U-Boot SPL"}),
        ("u-boot", {"kernel": r"Starting kernel"}),
        ("kernel", {"systemd": r"Welcome to [^\n]*!"}),
        ("userspace", {"banner": r"=== Jupyter workstation setup"}),
        ("wizard", {"begin": r"Press Enter (?:\(nothing else\) )?to begin setup[^\n]*"}),
    ]:
        seen.append(console.expect(patterns, 10, phase))
    assert [m.name for m in seen] == ["spl", "kernel", "systemd", "banner", "begin"]
    # The real line is "\e[0;1;39mWelcome to \e[0m\e[1mDebian GNU/Linux 13 (trixie)\e[0m...!"
    assert seen[2].text == "Welcome to Debian GNU/Linux 13 (trixie)!"
    # The prompt was found without a newline after it: nothing more had been written.
    assert seen[4].text == PROMPT.decode()
    assert line.log.getvalue() == BEFORE_ENTER

    enter.set()
    seen.append(console.expect({"done": r"Setup is complete\."}, 10, "wizard"))
    seen.append(console.expect({"login": r"(\S+) login: "}, 10, "login"))
    assert seen[-1].groups == ("pcplus-lab",)
    assert seen[-1].text == "pcplus-lab login: "

    times = [m.at for m in seen]
    assert started < times[0]
    assert all(a < b for a, b in itertools.pairwise(times)), times
    assert times[-1] <= time.monotonic()

    line.wait_played()
    console.wait_quiet(0.2)
    assert line.log.getvalue() == RECORDING
    assert line.echo.getvalue() == RECORDING


def test_recording_is_representative() -> None:
    assert len(RECORDING) < 40 << 10
    for needle in [b"U-Boot SPL", b"Starting kernel ...", b"Welcome to \x1b[0m", b"\r\r\n",
                   b"\x1bM\r\x1b[K", b"\x1b]104\x07", b"INFO: task", BANNER, PROMPT + b"\r\n",
                   b"Setup is complete.", b"pcplus-lab login: "]:
        assert needle in RECORDING, needle
    assert not re.search(rb"Token: \S", RECORDING)


def test_prompts_split_byte_by_byte_are_found(line: Line) -> None:
    """The banner, the wizard's prompt and the login prompt arrive one byte per read."""
    banner_at = BEFORE_ENTER.index(BANNER)
    login_at = AFTER_ENTER.index(LOGIN_LINE)
    login_end = AFTER_ENTER.index(b"login: ") + len(b"login: ")
    enter = threading.Event()
    line.play(chunked(BEFORE_ENTER[:banner_at], seed=3) + bytewise(BEFORE_ENTER[banner_at:])
              + [enter] + chunked(AFTER_ENTER[:login_at], seed=4)
              + bytewise(AFTER_ENTER[login_at:login_end]) + [AFTER_ENTER[login_end:]])
    console = line.console
    banner = console.expect({"banner": r"=== Jupyter workstation setup \(([^)\n]*)\) ==="}, 10,
                            "userspace")
    assert banner.groups == ("Orange Pi PC +",)
    reads_before_prompt = line.log.writes
    begin = console.expect({"begin": r"Press Enter to begin setup on this console\. "}, 10,
                           "wizard")
    assert begin.text == PROMPT.decode()
    # The prompt really came in pieces (else this test proves nothing).
    assert line.log.writes - reads_before_prompt > len(PROMPT) // 4
    enter.set()
    login = console.expect({"login": r"(\S+) login: "}, 10, "login")
    assert login.groups == ("pcplus-lab",)
    line.wait_played()
    console.wait_quiet(0.2)
    assert line.log.getvalue() == RECORDING


# Several patterns.

def test_earliest_of_several_patterns_wins_with_its_groups(line: Line) -> None:
    end = AFTER_ENTER[AFTER_ENTER.index(b"[\x1b[0;32m  OK  \x1b[0m] Started "
                                        b"\x1b[0;1;39mserial-getty"):]
    line.write(end)
    line.wait_logged(len(end))      # all of it has been read: order in the text decides
    console = line.console
    patterns = {
        "login": r"(\S+) login: (x)?",
        "password": r"Password: ",
        "issue": r"Debian GNU/Linux (\d+) (\S+) (\S+)",
        "target": r"Reached target (\S+)",
    }
    first = console.expect(patterns, 1, "login")
    assert (first.name, first.groups) == ("target", ("getty.target",))
    second = console.expect(patterns, 1, "login")
    assert (second.name, second.groups) == ("target", ("multi-user.target",))
    third = console.expect({k: v for k, v in patterns.items() if k != "target"}, 1, "login")
    assert third.name == "issue"
    assert third.groups == ("13", "pcplus-lab", "ttyS0")
    fourth = console.expect(patterns, 1, "login")
    assert fourth.name == "login"
    assert fourth.groups == ("pcplus-lab", "")      # an optional group that did not take part
    assert fourth.text == "pcplus-lab login: "
    # Matched text is consumed: the same prompt is not found twice.
    with pytest.raises(ConsoleTimeout):
        console.expect({"issue": patterns["issue"]}, 0.3, "login")


# Timeouts, failures, a closed line.

@pytest.mark.parametrize("chatter", [False, True], ids=["silent", "chatty"])
def test_timeout_names_the_phase_and_the_pattern(line: Line, chatter: bool) -> None:
    head = RECORDING[:KERNEL_START]
    if chatter:         # a guest that never stops talking must not defer the deadline
        spinner = [c for c in lines_of(RECORDING) if c.startswith(b"\x1bM\r\x1b[K[")]
        assert spinner
        line.play([head, *(spinner * 800)[:800]])
    else:
        line.play([head])
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as caught:
        line.console.expect({"banner": r"=== Jupyter workstation setup"}, 1.0, "userspace")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.5
    assert caught.value.phase == "userspace"
    assert "userspace" in str(caught.value)
    assert "'banner'" in str(caught.value)
    if chatter:
        assert not line.done.is_set()      # the guest was still talking at the deadline


FATAL_CASES = [
    pytest.param(KERNEL_START,
                 b"[    3.141592] Kernel panic - not syncing: VFS: Unable to mount root fs on "
                 b"unknown-block(0,0)\r\n[    3.141600] CPU: 0 PID: 1 Comm: swapper/0\r\n",
                 "the kernel panicked", "VFS: Unable to mount root fs", id="panic"),
    pytest.param(KERNEL_START,
                 b"Gave up waiting for root file system device.  Common problems:\r\n"
                 b" - Boot args (cat /proc/cmdline)\r\n",
                 "did not find the root filesystem", "Gave up waiting", id="rootdelay"),
    pytest.param(KERNEL_START,
                 b"ALERT!  UUID=8da334a5-7749-42a8-98f6-f113b7352da9 does not exist.  "
                 b"Dropping to a shell!\r\n",
                 "initrd did not find the root filesystem", "does not exist", id="alert"),
    pytest.param(RECORDING.index(b"Retrieving file: /boot/vmlinuz"),
                 b"Retrieving file: /boot/vmlinuz-6.12.117+deb13-armmp\r\n"
                 b"Failed to load '/boot/vmlinuz-6.12.117+deb13-armmp'\r\n",
                 "U-Boot could not load the kernel", "Failed to load", id="u-boot"),
]


@pytest.mark.parametrize(("cut", "fatal", "meaning", "detail"), FATAL_CASES)
def test_fatal_line_fails_fast(line: Line, cut: int, fatal: bytes, meaning: str,
                               detail: str) -> None:
    # The guest then sits there (the line stays open), as a panicked kernel does.
    line.play([*chunked(RECORDING[:cut], seed=5), fatal])
    started = time.monotonic()
    with pytest.raises(GuestFailed) as caught:
        line.console.expect({"systemd": r"Welcome to [^\n]*!"}, 30, "kernel")
    assert time.monotonic() - started < 3
    assert caught.value.phase == "kernel"
    assert meaning in str(caught.value)
    assert detail in str(caught.value)


def test_closed_line_raises_closed_not_timeout(line: Line) -> None:
    line.play([*chunked(RECORDING[:KERNEL_START], seed=6), "close"])
    started = time.monotonic()
    with pytest.raises(ConsoleClosed) as caught:
        line.console.expect({"banner": r"=== Jupyter workstation setup"}, 30, "userspace")
    assert time.monotonic() - started < 3
    assert caught.value.phase == "userspace"
    assert "'banner'" in str(caught.value)
    assert line.log.getvalue() == RECORDING[:KERNEL_START]


def test_last_words_before_hangup_are_still_matched(line: Line) -> None:
    last_words = BEFORE_ENTER[BEFORE_ENTER.index(BANNER):]   # small enough for the pty's buffer
    line.write(last_words)
    line.close_slave()
    got = line.console.expect({"begin": r"Press Enter to begin setup[^\n]*"}, 5, "wizard")
    assert got.text == PROMPT.decode()
    with pytest.raises(ConsoleClosed):
        line.console.expect({"done": r"Setup is complete\."}, 5, "wizard")
    assert line.log.getvalue() == last_words


# Noise on the line.

ANSI = [b"\x1b[0;1;31m", b"\x1b[0m", b"\x1b[K", b"\x1bM", b"\x1b[?25h", b"\x1b[6n",
        b"\x1b[32766;32766H", b"\x1b[!p", b"\x1b]104\x07", b"\x1b]0;title\x1b\\"]
# Noise that is not text and must vanish from the prompt's own line.
QUIET_NOISE = [b"\x00", b"\x00\x00\x00", b"\xff\xff\xff\xff", b"\xe2\x80", b"\xc3", b"\xf0\x9f",
               b"\x7f", b"\x08", *ANSI]


def noisy_boot(seed: int) -> list[Chunk]:
    """The boot up to the wizard's prompt with garbage between lines and inside them."""
    rng = random.Random(seed)

    def garbage() -> bytes:
        kind = rng.randrange(6)
        if kind == 0:
            return rng.randbytes(rng.randint(1, 200))
        if kind == 1:
            return b"\x00" * rng.randint(1, 64)
        if kind == 2:
            return b"\xff" * rng.randint(1, 64)
        if kind == 3:
            return rng.choice([b"\xe2\x80", b"\xc3", b"\xf0\x9f\x98", b"\x80\x80", b"\xed\xa0\x80"])
        if kind == 4:
            return rng.choice(ANSI)
        return b"\x1b"          # a lone escape, at the end of a chunk

    banner_at = BEFORE_ENTER.index(BANNER)
    chunks: list[Chunk] = []
    for text in lines_of(BEFORE_ENTER[:banner_at]):
        cut = rng.randrange(len(text))
        chunks += [garbage() + text[:cut] + garbage() + text[cut:], garbage()]
    # The wizard's own lines: noise that a terminal would not show, between and inside words.
    for text in lines_of(BEFORE_ENTER[banner_at:]):
        words = text.split(b" ")
        chunks.append(b"".join(w + b" " + rng.choice(QUIET_NOISE) for w in words[:-1])
                      + words[-1])
        chunks.append(garbage() + b"\r\n")
    return chunks


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_garbage_does_not_hide_a_later_prompt(line: Line, seed: int) -> None:
    chunks = noisy_boot(seed)
    line.play(chunks)
    console = line.console
    banner = console.expect({"banner": r"=== Jupyter workstation setup \(([^)\n]*)\)"}, 10,
                            "userspace")
    assert banner.groups == ("Orange Pi PC +",)
    begin = console.expect({"begin": r"Press Enter to begin setup on this console\."}, 10,
                           "wizard")
    assert begin.name == "begin"
    line.wait_played()
    console.wait_quiet(0.2)
    assert line.log.getvalue() == b"".join(c for c in chunks if isinstance(c, bytes))


# Typing, quiet, forgetting.

@pytest.mark.parametrize("text", ["answer\r", "\r", "a password longer than sixteen bytes\r",
                                  "Europe/Zürich → ok\r"])
def test_send_arrives_byte_exact(line: Line, text: str) -> None:
    line.console.send(text)
    expected = text.encode()
    assert line.read_slave(len(expected)) == expected
    assert line.read_slave(1, timeout=0.1) == b""       # and nothing more


def test_wait_quiet_returns_after_silence(line: Line) -> None:
    burst = lines_of(RECORDING[RECORDING.index(b"\x1bM\r\x1b[K["):])[:10]
    chunks: list[Chunk] = []
    for text in burst:
        chunks += [text, 0.05]
    line.play(chunks)
    time.sleep(0.02)
    line.console.wait_quiet(0.3)
    returned = time.monotonic()
    assert line.done.is_set()
    assert returned - line.last_write >= 0.3 - 0.02   # the read may stamp just before
    assert returned - line.last_write < 0.3 + 0.5
    assert line.log.getvalue() == b"".join(burst)


def test_wait_quiet_longer_than_a_second(line: Line) -> None:
    """try-image waits 3 s after the login prompt: a kernel message 1.2 s later is read first."""
    line.play([b"pcplus-lab login: ", 1.2,
               b"[  490.800661] INFO: task kworker/2:0:30 blocked for more than 368 seconds.\r\n"])
    started = time.monotonic()
    line.console.wait_quiet(1.5)
    assert time.monotonic() - started >= 1.2 + 1.5 - 0.1
    assert b"INFO: task" in line.log.getvalue()


def test_forget_drops_an_old_prompt(line: Line) -> None:
    console = line.console
    old = b"Debian GNU/Linux 13 pcplus-lab ttyS0\r\n\r\npcplus-lab login: "
    line.write(old)
    line.wait_logged(len(old))
    console.forget()
    with pytest.raises(ConsoleTimeout):
        console.expect({"login": r"login: "}, 0.3, "login")
    # Without forget() the text would have matched; it is still in the log.
    assert line.log.getvalue().endswith(b"login: ")
    line.write(b"\r\nLogin incorrect\r\npcplus-lab login: ")
    got = console.expect({"login": r"(\S+) login: ", "issue": r"Debian GNU/Linux"}, 2, "login")
    assert got.name == "login"
    assert got.groups == ("pcplus-lab",)


# The tail of a log, for an error report.

def test_tail_is_short_and_clean(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(RECORDING)
    text = tail(path, 50)
    lines = text.split("\n")
    assert 0 < len(lines) <= 50
    assert "\x1b" not in text
    assert "\r" not in text
    assert lines[-1].endswith("00000000 00000000 00000000 00000000 00000013 00000000")
    assert len(tail(path, 5).split("\n")) == 5
    head = tail(path, 10_000)
    assert "Welcome to Debian GNU/Linux 13 (trixie)!" in head
    assert "[  OK  ] Started serial-getty@ttyS0.service - Serial Getty on ttyS0." in head
    assert tail(tmp_path / "missing.log") == ""


# Found by these tests and fixed: sequences cut between reads, short escapes, a fatal line
# reported before its cause had arrived.

@pytest.mark.parametrize(("first", "second", "pattern", "expected"), [
    (b"\x1b[0;1;39mWelcome to \x1b[0m\x1b[", b"1mDebian GNU/Linux 13 (trixie)\x1b[0m!\r\n",
     r"Welcome to ([^\n]*)!", "Debian GNU/Linux 13 (trixie)"),
    (b"Job systemd-networkd-wait-\xe2\x80", b"\xa6tart running (3min 28s)\r\n",
     r"wait-(\S+) running", "\u2026tart"),
], ids=["escape", "utf-8"])
def test_sequence_split_between_reads(line: Line, first: bytes, second: bytes, pattern: str,
                                      expected: str) -> None:
    line.write(first)
    line.wait_logged(len(first))    # the first part is read on its own, as at 115200 baud
    line.write(second)
    got = line.console.expect({"line": pattern}, 2, "kernel")
    assert got.groups == (expected,)


def test_fatal_message_has_the_whole_line(line: Line) -> None:
    line.play([RECORDING[:KERNEL_START], b"[    3.141592] Kernel panic - not syncing: ", 0.2,
               b"VFS: Unable to mount root fs on unknown-block(0,0)\r\n"])
    with pytest.raises(GuestFailed) as caught:
        line.console.expect({"systemd": r"Welcome to [^\n]*!"}, 10, "kernel")
    assert "VFS: Unable to mount root fs" in str(caught.value)


@pytest.mark.parametrize("escape", [b"\x1b7", b"\x1b8", b"\x1bc", b"\x1b>", b"\x1b(B\x1b[m"],
                         ids=["save", "restore", "reset", "keypad", "sgr0"])
def test_other_escapes_are_removed(line: Line, escape: bytes) -> None:
    line.write(b"Press Enter" + escape + b" to begin setup on this console. ")
    got = line.console.expect({"begin": r"Press Enter[^\n]*to begin setup"}, 2, "wizard")
    assert got.text == "Press Enter to begin setup"
