"""Files: atomic writes, checkpoints, hashes, and loading models from ONNX or PyTorch files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qlp_compress.base.errors import QLPError, UsageError, os_error_line

# Inputs read whole into memory, and the most the tool reads of each kind: (environment variable that
# overrides the limit, default limit in bytes). A file over the limit is refused before it is read.
SIZE_LIMITS = {
    "model": ("QLP_MAX_MODEL_BYTES", 2 << 30),  # an ONNX or PyTorch model file (with its external data)
    "data": ("QLP_MAX_DATA_BYTES", 8 << 30),  # the arrays of a .npz data set, uncompressed
}


def size_limit(kind: str) -> int:
    """The byte limit for inputs of `kind` ("model" or "data"): its environment variable, else the default."""
    variable, default = SIZE_LIMITS[kind]
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{variable}={raw!r} is not a whole number of bytes; set it to e.g. {default}") from None


def check_size(nbytes: int, what: str, kind: str) -> None:
    """Refuse an input of `nbytes` over the limit for `kind`, naming the limit and how to raise it."""
    limit = size_limit(kind)
    if nbytes > limit:
        raise QLPError(f"{what} is {format_bytes(nbytes)}, over the {format_bytes(limit)} limit for {kind} inputs; "
                       f"if the machine has the memory for it, raise the limit with {SIZE_LIMITS[kind][0]}=BYTES")


def format_bytes(n: int) -> str:
    """1536 → "1.5 KiB"; below 1 KiB, "N bytes"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_file_size(path: Path, kind: str) -> None:
    try:
        nbytes = Path(path).stat().st_size
    except OSError as e:
        raise QLPError(f"{path} cannot be read ({e.strerror}); check the path and its permissions") from e
    check_size(nbytes, str(path), kind)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash, a kill -9 or a full disk leaves `path` as it was (a stray `.tmp` file at worst)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
    except OSError as e:
        raise QLPError(f"cannot write in {path.parent} ({e.strerror}); choose a writable folder with --out") from e
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise QLPError(f"writing {path} failed ({e.strerror}); free some disk space or choose another "
                       "--out; nothing was overwritten") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into memory, then an atomic write: a full disk is an OSError (a one-line QLPError), not the
    RuntimeError torch's own file writer raises."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    """A checkpoint this tool wrote (tensors, numbers, lists, dicts only: weights_only loading)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a dict")
        return state
    except Exception as e:
        raise QLPError(f"checkpoint {path} is unreadable ({type(e).__name__}); pass --force instead of --resume to "
                       "start over") from e


@contextlib.contextmanager
def disk_errors(what: str) -> Iterator[None]:
    """A full disk, the file size limit or a name too long while writing `what` → a one-line QLPError."""
    try:
        yield
    except OSError as e:
        line = os_error_line(e, what)
        if line is None:
            raise
        raise QLPError(line) from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlp-compress"
