"""Errors a user can meet. The CLI prints them as one line and exits with `exit_code`."""


class QLPError(Exception):
    """A failure with a one-line message that names the problem and the fix (exit code 1)."""

    exit_code = 1


class UsageError(QLPError):
    """The user asked for something that cannot work as given (exit code 2)."""

    exit_code = 2


class Interrupted(QLPError):
    """Ctrl-C or SIGTERM stopped a run after its checkpoint was kept (exit code 130, as a shell reports SIGINT)."""

    exit_code = 130


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
