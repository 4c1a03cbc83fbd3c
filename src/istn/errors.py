"""The one exception type for errors a user can cause (files, configs, shapes)."""


class IstnError(Exception):
    """A user-facing error: the message names the file or field and what to do.

    The CLI prints it on one line and exits with status 2.
    """


def count(n: int, noun: str) -> str:
    """``1 pair``, ``2 pairs``: a number with its noun, singular for one (messages)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
