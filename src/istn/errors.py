"""The one exception type for errors a user can cause (files, configs, shapes)."""


class IstnError(Exception):
    """A user-facing error: the message names the file or field and what to do.

    The CLI prints it on one line and exits with status 2.
    """
