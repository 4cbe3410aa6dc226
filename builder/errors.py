"""The ways a command stops early, each reported as one line without a traceback."""

from __future__ import annotations

from collections.abc import Sequence


class BuildError(Exception):
    """A problem the user can fix: the message names the thing and the fix. `details`, when
    there are several problems of one kind (a preseed file's bad lines), are shown one per
    line under it, so that one run shows them all."""

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = tuple(details)


class UsageError(BuildError):
    """The command line asks for something it cannot have: a flag's value, flags that
    exclude each other, a configuration or preseed file it names. Exit 2, as argparse's own
    errors, whichever check found it; a failure while doing the work is exit 1."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in library code does not
    swallow it and every context manager on the way out still runs its cleanup.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
