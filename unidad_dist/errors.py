"""User-facing errors.

A ``UserError`` is raised for bad input (config, paths, data). Its message names the problem and the
fix in one line; the CLI prints it as ``error: <message>`` and exits non-zero, before any expensive work.
"""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""
