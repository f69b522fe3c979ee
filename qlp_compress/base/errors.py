"""Errors a user can meet. The CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations

import errno
import tempfile


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


def os_error_line(e: OSError, what: str | None = None) -> str | None:
    """One line naming the problem and the fix for an OSError a user can act on (a full disk or quota, the file
    size limit, a name too long for the file system); None for any other. `what` names the file being written."""
    what = what or (f"{e.filename}" if e.filename else "a file")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"writing {what} failed ({e.strerror}); free some disk space (temporary files go to "
                f"{tempfile.gettempdir()}: set TMPDIR to a folder with room) and rerun")
    if e.errno == errno.EFBIG:
        return (f"writing {what} failed ({e.strerror}): it is over the file size limit (`ulimit -f`) or the file "
                f"system's; raise the limit, or set TMPDIR to a folder on another file system, and rerun")
    if e.errno == errno.ENAMETOOLONG:
        return f"a file name is too long for the file system ({str(what)[:80]}...); choose a shorter --out"
    return None
