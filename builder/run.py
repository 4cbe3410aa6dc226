"""The one way the builder starts programs.

argv lists only (never a shell string), stdin from /dev/null unless input is given, the command
shown in --debug output, and a failure turned into a one-line BuildError that says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from builder import log
from builder.errors import BuildError

# Host programs the builder calls, and the Debian package that provides each, so a missing
# program is reported with the command that installs it.
HOST_PACKAGES: dict[str, str] = {
    "gpg": "gpg",
    "gpgv": "gpgv",
    "xz": "xz-utils",
    "zstd": "zstd",
    "gzip": "gzip",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "sfdisk": "fdisk",
    "blkid": "util-linux",
    "fstrim": "util-linux",
    "unshare": "util-linux",
    "blockdev": "util-linux",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "bmaptool": "bmap-tools",
    "dpkg-query": "dpkg",
    "chroot": "coreutils",
    "sync": "coreutils",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mtype": "mtools",
}


# What a host program sees of the builder's environment: where programs, home and temporary
# files are, the terminal, and what reaches the network (proxies, CA bundles, pip's index and
# its network settings; not pip's other options, PIP_NO_DEPS or PIP_USER, which would change
# what is chosen rather than where from). The locale is always C.UTF-8: the builder reads
# programs' output ("Device or resource busy" from losetup, "No such device"), which a host
# speaking German would translate; LANGUAGE, which outranks LC_ALL for messages, stays out.
PASSED_ENV = frozenset({
    # PYTHONPATH: where the builder itself was found, for the Python programs it starts
    # (the wheels step, host scripts running builder modules).
    "PATH", "PYTHONPATH", "HOME", "USER", "LOGNAME", "TERM", "TMPDIR",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NETRC",
    "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR",
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_CLIENT_CERT",
    "PIP_PROXY", "PIP_TIMEOUT", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_CONFIG_FILE",
    "PIP_CACHE_DIR", "PIP_KEYRING_PROVIDER",
})


def host_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a host program: the allow-list above, C.UTF-8, then `extra`."""
    env = {key: value for key, value in os.environ.items() if key in PASSED_ENV}
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8")
    env.update(extra or {})
    return env


def install_hint(program: str) -> str:
    package = HOST_PACKAGES.get(program, program)
    return f"install it with: apt-get install {package}"


def require_programs(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        names = ", ".join(missing)
        packages = " ".join(sorted({HOST_PACKAGES.get(p, p) for p in missing}))
        raise BuildError(
            f"{names} not found on this host: install with: apt-get install {packages}")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    capture: bool = False,
    check: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run argv and wait. With capture, stdout and stderr are returned instead of shown.

    `what` names the action for the error message ("verify the signature of X"); `env`
    replaces host_env() (callers build theirs from it).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ " + shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            env=dict(env) if env is not None else host_env(),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            check=False,
        )
    except FileNotFoundError:
        raise BuildError(f"{args[0]} not found on this host: {install_hint(args[0])}") from None
    if check and proc.returncode != 0:
        detail = last_line(proc.stderr) if capture else ""
        action = what or shlex.join(args)
        suffix = f": {detail}" if detail else ""
        raise BuildError(f"could not {action} ({args[0]} exited {proc.returncode}){suffix}")
    return proc


def last_line(output: bytes | None) -> str:
    lines = (output or b"").decode(errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


@contextmanager
def spawn(
    argv: Sequence[str | os.PathLike[str]], *, stdin: IO[bytes], what: str,
    stdout: IO[bytes] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start argv with its stdout as a pipe for the caller to read (or into `stdout`); on
    leaving, wait for it and turn a non-zero exit into a BuildError carrying its last line
    of stderr.

    stderr goes to a temporary file, not a pipe: a chatty program cannot then block on a
    full pipe that nobody reads. If the caller's block raises, the program is killed.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ " + shlex.join(args))
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(args, stdin=stdin, stderr=errors, env=host_env(),
                                    stdout=subprocess.PIPE if stdout is None else stdout)
        except FileNotFoundError:
            raise BuildError(f"{args[0]} not found on this host: {install_hint(args[0])}") from None
        try:
            yield proc
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdout:
                proc.stdout.close()
        code = proc.wait()
        if code != 0:
            errors.seek(0)
            detail = last_line(errors.read())
            raise BuildError(f"could not {what} ({args[0]} exited {code}): {detail}")


def stream(argv: Sequence[str], *, env: Mapping[str, str], prefix: str | None,
           what: str, cwd: Path | None = None, stop: int = signal.SIGKILL,
           preexec: Callable[[], None] | None = None) -> None:
    """Run argv, showing each line of its output as it comes, prefixed with `[prefix]`, and
    copying it into the build log. A failure is a BuildError with the exit code, after the
    last lines were shown.

    On an interruption the program's whole process group gets `stop`; a program that cleans
    up after itself on SIGTERM (debootstrap unmounts what it mounted) is given time for it
    before everything left is killed. `preexec` runs in the child before argv (limits)."""
    log.debug("+ " + " ".join(argv))
    tail: list[str] = []
    # A session of its own: on an interruption the whole group goes, not just the script
    # (a dpkg run leaves postinst children that would outlive it).
    proc = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec)
    assert proc.stdout is not None
    pending = b""

    def show(data: bytes) -> None:
        nonlocal tail
        for raw in data.split(b"\n"):
            line = raw.decode(errors="replace")
            tail = [*tail[-19:], line]
            log.step_output(f"[{prefix}] {line}" if prefix else line)

    try:
        # Not `for line in stdout`: that waits for every holder of the pipe, and a daemon the
        # script started in the background holds it for ever. The script's own exit ends the
        # step; what its group still prints within a moment is shown, then the group goes.
        fd = proc.stdout.fileno()
        exited_at: float | None = None
        while True:
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
            if exited_at is not None and time.monotonic() - exited_at > 2:
                break
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b"\n")
            if lines:
                show(b"\n".join(lines))
        if pending:
            show(pending)
        code = proc.wait()
    except BaseException:
        if stop != signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, stop)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    if code != 0:
        if code == 127 and not tail:
            raise BuildError(f"{what}: command not found")
        log.info(f"last lines of {what}:")
        for line in tail[-10:]:
            log.info(f"  | {line}")
        raise BuildError(f"{what} failed with exit code {code}")


# The C library, for the calls Python's os module lacks (prctl, sync_file_range).
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn for a helper process (QEMU, Chromium) that must not outlive us, even
    when we are killed with SIGKILL: the kernel kills it when its parent dies."""
    parent = os.getpid()

    def arrange() -> None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:      # the parent died before prctl took effect
            os._exit(1)

    return arrange

