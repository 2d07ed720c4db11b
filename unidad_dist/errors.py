"""User-facing errors.

A ``UserError`` is raised for bad input (config, paths, data). Its message names the problem and the
fix in one line; the CLI prints it as ``error: <message>`` and exits non-zero, before any expensive work.
"""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class CheckpointGone(UserError):
    """The checkpoint asked for is not (or no longer) there: pruned by ``checkpoint.keep``, or never written."""


class StoppedBySignal(Exception):
    """A run stopped cleanly at an iteration boundary because the process was asked to stop (SIGTERM, SIGINT,
    SIGHUP). The CLI prints the message and exits 128 + ``signum``, as a process killed by it would."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
