"""An output folder written as a set: a run's files are all new or all as they were, never a mix.

A run that writes a folder (`search`, `prune`, `compare`) works in `OUT/.work/`: its checkpoints (for
`--resume`), a lock file that keeps a second run out, and `out/`, where its output files are written. Only when
every file is complete are they put in place: the previous run's files (those OUT's record, `.qlp-outputs.json`,
lists) move to `.work/old/`, the new ones and the new record move in, and `.work/` is deleted. An error or an
interrupt before or during that swap puts the previous files back. A list of the files to move
(`.work/commit.json`) is written first, so a run killed outright (kill -9, a power cut) in the middle of the swap
is finished by the next run in that folder. What the tool treats as its own, and why no user file is ever
replaced or deleted, is in qlp_compress.base.ownership.

Commands that write one file (`finetune`, `export`, `train`) write it atomically (qlp_compress.base.io) and lock it
with a hidden `.NAME.lock` beside it while they run; their checkpoint is `.NAME.qlp-ckpt`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError
from qlp_compress.base.interrupts import deferred_interrupts
from qlp_compress.base.io import atomic_path, atomic_write_json
from qlp_compress.base.locks import Lock, check_unlocked, remove_empty
from qlp_compress.base.ownership import (
    CHECKPOINTS,
    MANIFEST,
    OUTPUT_FOLDERS,
    OUTPUT_NAMES,
    WORK,
    check_work,
    in_the_way,
    is_own,
    owned_outputs,
    refuse_in_the_way,
)


def write_together(files: dict[Path, bytes]) -> None:
    """Write several files as a set: each to a hidden temporary file beside it first (where a full disk fails
    before anything is touched), then each replaces its previous version in one rename. The previous versions
    are kept as hard links until all are in place, so a failed rename puts them back."""
    pid = os.getpid()
    staged: dict[Path, Path] = {}
    kept: dict[Path, Path | bytes | None] = {}  # the previous version: a hard link, its bytes, or None (no file)
    try:
        for path, data in files.items():
            with atomic_path(path.parent / f".{path.name}.{pid}.new") as tmp:
                staged[path] = tmp.with_name(f".{path.name}.{pid}.new")
                tmp.write_bytes(data)
        with deferred_interrupts():
            for path in files:
                kept[path] = _keep(path, path.parent / f".{path.name}.{pid}.old")
            done: list[Path] = []
            try:
                for path, tmp in staged.items():
                    os.replace(tmp, path)
                    done.append(path)
            except OSError as e:
                for path in done:
                    _restore(path, kept[path])
                raise QLPError(f"putting {', '.join(str(p) for p in files)} in place failed ({e.strerror}); the "
                               "previous files are as they were: free some disk space or choose another --out") from e
    finally:
        for leftover in (*staged.values(), *(k for k in kept.values() if isinstance(k, Path))):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _keep(path: Path, link: Path) -> Path | bytes | None:
    if not path.exists():
        return None
    try:
        os.link(path, link)
        return link
    except OSError:  # a file system without hard links: keep the bytes
        return path.read_bytes()


def _restore(path: Path, kept: Path | bytes | None) -> None:
    with contextlib.suppress(OSError, QLPError):
        if kept is None:
            path.unlink()
        elif isinstance(kept, Path):
            os.replace(kept, path)
        else:
            with atomic_path(path) as tmp:
                tmp.write_bytes(kept)


# ------------------------------------------------------------------------------------------ the folder


def check_writable(folder: Path, out: Path) -> None:
    """`folder` exists and is writable, or can be created in a writable folder."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise QLPError(f"cannot create {out}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QLPError(f"cannot write in {existing} (permission denied); choose a writable --out")


def _listing(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise QLPError(f"cannot read the output folder {folder} ({e.strerror}); choose another --out") from e


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def check_out_dir(out: Path, force: bool, resume: bool, resumable: bool = True, writes: tuple[str, ...] = ()) -> None:
    """Refuse, without creating anything, an output folder that may not (or cannot) be written:

    - files of an earlier run are replaced only with --force (with or without --resume), and only those the tool
      wrote: a file among `writes` (the outputs the run will write) that OUT's record does not list is refused;
    - an interrupted run (OUT/.work) is continued with --resume or started over with --force;
    - OUT/.work holding what the tool did not write, or a damaged commit.json, is refused (ownership.check_work);
    - a folder that another run is using is refused."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    names = _listing(out) if out.is_dir() else []
    files = [n for n in names if n != WORK]
    work = out / WORK
    if WORK in names:
        check_unlocked(work / "lock", str(out))
        check_work(out)
    if files and not force:
        if resume and WORK in names:
            raise UsageError(f"output folder {out} already exists and holds files of an earlier run "
                             f"({_shown(files)}) that the resumed run would replace; add --force to --resume to "
                             "allow that, or choose another --out")
        if resume:
            raise UsageError(f"output folder {out} already exists and holds a finished run ({_shown(files)}); "
                             "there is nothing to resume: pass --force to run again and replace its files, or "
                             "choose another --out")
        how = "--resume to continue, " if resumable else ""
        raise UsageError(f"output folder {out} already exists; pass --force to overwrite, {how}or choose another "
                         "--out")
    if WORK in names and not (force or resume):
        how = "pass --resume to continue it, --force to start over" if resumable else "pass --force to start over"
        raise UsageError(f"output folder {out} already exists and holds an interrupted run ({work}); {how}, or "
                         "choose another --out")
    refuse_in_the_way(out, in_the_way(out, writes))
    check_writable(out, out)


class OutputRun:
    """A run that writes the folder `out` as a set (see the module docstring).

        with OutputRun(out, force, resume) as run:
            write files under run.staging ... ; checkpoints under run.work
            run.commit()
    """

    def __init__(self, out: Path, force: bool, resume: bool, resumable: bool = True):
        self.out, self.force, self.resume, self.resumable = Path(out), force, resume, resumable
        self.work = self.out / WORK
        self.staging = self.work / "out"
        self.old = self.work / "old"
        self.journal = self.work / "commit.json"
        self.lock = Lock(self.work / "lock", str(self.out))
        self.created: Path | None = None  # the outermost folder this run created (removed again on failure)
        self.committed = False

    def __enter__(self) -> OutputRun:
        check_out_dir(self.out, self.force, self.resume, self.resumable)
        folder = self.out.absolute()
        self.created = next((p for p in reversed((folder, *folder.parents)) if not p.exists()), None)
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QLPError(f"cannot create {self.work} ({e.strerror}); choose a writable --out") from e
        self.lock.acquire()
        try:  # nothing in .work is touched before it is known to be the tool's
            journal = check_work(self.out)
            if journal is not None:  # a run killed during its swap: finish it first
                self._swap(*journal)
                self._finish(journal[1])
        except OSError as e:
            self.lock.release()
            raise QLPError(f"cannot finish putting an interrupted run's files in place in {self.out} ({e.strerror}); "
                           "fix the folder's permissions and rerun") from e
        except BaseException:
            self.lock.release()
            raise
        try:
            if not self.resume:  # start over: an earlier run's checkpoints are not continued
                for name in CHECKPOINTS:
                    (self.work / name).unlink(missing_ok=True)
            for name in OUTPUT_FOLDERS:  # a folder staged by a run that stopped before its commit: work again
                staged, back = self.staging / name, self.work / name
                if staged.is_dir() and not staged.is_symlink() and not os.path.lexists(back):
                    os.replace(staged, back)
            _remove_own(self.staging)
            self.staging.mkdir()
        except OSError as e:
            self._cleanup()
            raise QLPError(f"cannot prepare {self.work} ({e.strerror}); choose a writable --out") from e
        except BaseException:
            self._cleanup()
            raise
        return self

    def commit(self) -> None:
        """Put the staged files in place of the previous run's (those OUT's record lists), as one set."""
        with deferred_interrupts():
            new = sorted(p.name for p in self.staging.iterdir() if p.name in OUTPUT_NAMES)
            refuse_in_the_way(self.out, in_the_way(self.out, new), " and rerun")
            atomic_write_json(self.staging / MANIFEST, {"files": new, "written_by": "qlp-compress"})
            new, replace = [*new, MANIFEST], [*sorted(owned_outputs(self.out)), MANIFEST]
            atomic_write_json(self.journal, {"new": new, "replace": replace})
            try:
                self._swap(new, replace)
            except OSError as e:
                if self._roll_back(new):
                    raise QLPError(f"putting the new files in {self.out} failed ({e.strerror}); the previous files "
                                   "are as they were: free some disk space or fix the folder's permissions and "
                                   "rerun") from e
                raise QLPError(f"putting the new files in {self.out} failed ({e.strerror}), and some previous files "
                               f"could not be put back: they are in {self.old}; move them back by hand") from e
            self._finish(replace)
            self.committed = True

    def _swap(self, new: list[str], replace: list[str]) -> None:
        """Move the previous outputs (`replace`) to .work/old and the staged ones (`new`) in; safe to repeat after an
        interruption. A file in the way that is not the tool's is refused before anything moves."""
        refuse_in_the_way(self.out, [n for n in new if n not in replace and (self.staging / n).exists()
                                     and os.path.lexists(self.out / n)])
        self.old.mkdir(exist_ok=True)
        for name in replace:  # previous files: those not yet replaced by a staged one
            if os.path.lexists(self.out / name) and ((self.staging / name).exists() or name not in new):
                os.replace(self.out / name, self.old / name)
        for name in new:
            if (self.staging / name).exists():
                os.replace(self.staging / name, self.out / name)

    def _finish(self, replace: list[str]) -> None:
        """After a complete swap: the previous files go, then the journal."""
        for name in replace:
            path = self.old / name
            if name in OUTPUT_FOLDERS and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # the tool's own folder (OUT's record listed it)
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.old.rmdir()
        self.journal.unlink(missing_ok=True)

    def _roll_back(self, new: list[str]) -> bool:
        """After a failed swap: the staged files that went in come out, the previous ones go back. False when a
        previous file could not be put back (it then stays in .work/old, which is kept)."""
        for name in new:
            if (self.out / name).exists() and not (self.staging / name).exists():
                with contextlib.suppress(OSError):
                    os.replace(self.out / name, self.staging / name)
        for path in self.old.iterdir() if self.old.exists() else ():
            with contextlib.suppress(OSError):
                os.replace(path, self.out / path.name)
        self.journal.unlink(missing_ok=True)
        return not (self.old.exists() and any(self.old.iterdir()))

    def __exit__(self, kind, error, traceback) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        """After success: remove .work. After a failure: remove the staged files, and .work and the folders this
        run created when no checkpoint is left in them (a checkpoint stays for --resume). Only the tool's own
        names are removed; a folder that holds anything else stays."""
        _remove_own(self.staging)
        if not (self.old.exists() and any(self.old.iterdir())):  # never a file not put back
            with contextlib.suppress(OSError):
                self.old.rmdir()
        keep = not self.committed and any((self.work / name).exists() for name in (*CHECKPOINTS, "old"))
        if self.committed:
            for name in CHECKPOINTS:
                (self.work / name).unlink(missing_ok=True)
        if not keep:  # temporaries of atomic writes a kill -9 cut short (never an output): .work can go
            for stray in self.work.glob(".*.tmp"):
                stray.unlink(missing_ok=True)
        self.lock.release(delete=not keep)
        if not keep:
            with contextlib.suppress(OSError):
                self.work.rmdir()
        if not self.committed and self.created is not None:
            remove_empty(self.out.absolute(), self.created)


def _remove_own(folder: Path) -> None:
    """Remove the outputs and temporaries the tool writes in `folder` (.work/out), then the folder if empty."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if is_own(path.name, (*OUTPUT_NAMES, MANIFEST)) and not path.is_dir():
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
