"""Advisory locks that keep two runs out of one output (a folder's `.work/lock`, a file's hidden `.NAME.lock`):
taken at once or refused with the fix, released with the process, so a run killed outright leaves no stale lock."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from qlp_compress.base.errors import QLPError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded against each other there
    fcntl = None


class Lock:
    """An exclusive advisory lock (flock) on `path`, created if needed; refused at once if another process
    holds it. The lock goes with the process: a run killed outright leaves no stale lock."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = path, what, None
        self.created: Path | None = None  # the outermost folder created for the lock file

    def acquire(self) -> None:
        folder = self.path.parent.absolute()
        self.created = next((p for p in reversed((folder, *folder.parents)) if not p.exists()), None)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QLPError(f"cannot create {self.path} ({e.strerror}); choose a writable --out") from e
        if fcntl is None:
            self.fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            self.created = None
            raise QLPError(f"another qlp-compress run is using {self.what} (it holds {self.path}); wait for it to "
                           "finish or stop it, or choose another --out") from None
        if not same:  # the other run finished and deleted its lock file just now
            os.close(fd)
            raise QLPError(f"another qlp-compress run was using {self.what} and has just finished; check its "
                           "output, then rerun the command if needed")
        self.fd = fd

    def release(self, delete: bool = True) -> None:
        """Release the lock; with `delete`, remove the lock file and the folders made for it while empty."""
        if self.fd is None:
            return
        if delete:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if self.created is not None:
                remove_empty(self.path.parent.absolute(), self.created)
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def remove_empty(folder: Path, outermost: Path) -> None:
    """Remove `folder` and its parents up to `outermost` (included) while they are empty."""
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == outermost:
            return
        folder = folder.parent


def check_unlocked(path: Path, what: str) -> None:
    """Refuse at once (before any loading) when a running process holds the lock at `path`."""
    if fcntl is None or not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise QLPError(f"another qlp-compress run is using {what} (it holds {path}); wait for it to finish or "
                       "stop it, or choose another --out") from None
    finally:
        os.close(fd)


def file_lock(out: Path) -> Lock:
    """The lock of a one-file output: a hidden `.NAME.lock` beside it."""
    return Lock(out.parent / f".{out.name}.lock", str(out))
