"""The two ways a build stops early, both reported as one line without a traceback."""


class BuildError(Exception):
    """A problem the user can fix: the message names the thing and the fix."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived.

    A BaseException, like KeyboardInterrupt, so that `except Exception` in library code does not
    swallow it and every context manager on the way out still runs its cleanup.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
