"""What the tool owns: it deletes or replaces only files it wrote, and never its input.

- One-file outputs (`finetune`, `export`, `train`, `quantize`): beside OUT the tool writes only hidden names that
  no output takes: `.NAME.lock`, the checkpoint `.NAME.qlp-ckpt` (never `OUT.ckpt`, which may be OUT itself or a
  user's file), and temporaries `.NAME.*.tmp`, `.NAME.PID.new/.old`. An --out with such a name, or inside an
  output folder's `.work`, is refused, as is any output that would land on the input model or data, or a name too
  long for the working files beside it.
- Folders (`search`, `prune`, `compare`): a finished run leaves a record, `OUT/.qlp-outputs.json`, of the files it
  wrote. `--force` replaces only those (the next run moves them aside, then deletes them), never another file,
  even one with an output's name: a file in the way of the run's outputs that the record does not list is refused
  (move it or choose another --out). In `OUT/.work/` the tool removes only its own names (outputs, checkpoints,
  temporaries); a foreign file there, or previous files a failed run could not put back (`.work/old` with no
  `commit.json`), stops the run with the fix, as does a damaged `commit.json`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from qlp_compress.base.errors import QLPError, UsageError

WORK = ".work"  # the run's working folder inside OUT
MANIFEST = ".qlp-outputs.json"  # OUT's record of the files its last run wrote
# every file a folder-writing run may write in OUT
OUTPUT_NAMES = ("model.onnx", "model.sparse.onnx", "model.int8.onnx", "policy.json", "report.json", "report.md",
                "sparsity.png", "reward.png", "compare.json", "compare.md", "optimize.json", "pareto.png",
                "candidates")
OUTPUT_FOLDERS = ("candidates",)  # outputs that are folders (optimize's candidates, each an output folder itself)
CHECKPOINTS = ("search.ckpt", "selection.json", "selection.ckpt", "finetune.ckpt",
               "compare.json", "optimize.json")  # what --resume continues from (in .work)
WORK_NAMES = ("lock", "commit.json", "out", "old", *CHECKPOINTS, *OUTPUT_FOLDERS)  # what OUT/.work holds
# the hidden working files beside a one-file output (lock, checkpoint, atomic temporaries, write_together's)
_HIDDEN = re.compile(r"^\..+\.(lock|qlp-ckpt|tmp|\d+\.new|\d+\.old)$")
_TEMPORARY_OVERHEAD = 14  # an atomic write's temporary: ".NAME." + 8 random characters + ".tmp"


def file_checkpoint(out: Path) -> Path:
    """The checkpoint of a one-file output: a hidden `.NAME.qlp-ckpt` beside it (never OUT itself)."""
    return out.parent / f".{out.name}.qlp-ckpt"


def is_own(name: str, names: Iterable[str]) -> bool:
    """`name` is one of `names` or an atomic write's hidden temporary of one of them."""
    names = tuple(names)
    return name in names or (bool(_HIDDEN.match(name)) and any(name.startswith(f".{n}.") for n in names))


def same_file(a: Path, b: Path) -> bool:
    """`a` and `b` name the same file (also through links), or would once written."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _in_work(path: Path) -> bool:
    """`path` is an output folder's working folder, or one of the files or folders the tool keeps there."""
    parts = path.absolute().parts
    if path.name == WORK:
        return True
    if len(parts) >= 2 and parts[-2] == WORK and (path.name in WORK_NAMES or _HIDDEN.match(path.name)):
        return True
    return len(parts) >= 3 and parts[-3] == WORK and parts[-2] in ("out", "old")


def _name_max(folder: Path) -> int:
    existing = next((p for p in (folder, *folder.absolute().parents) if p.exists()), Path("/"))
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_file_out(out: Path, written: Sequence[Path], inputs: Sequence[Path | None] = ()) -> None:
    """Refuse a one-file --out whose files (`written`: OUT, its other forms and its checkpoint) would collide with
    the tool's working files or an input, or have names too long for the working files beside them."""
    if _HIDDEN.match(out.name):
        raise UsageError(f"--out {out}: hidden names ending in .lock, .qlp-ckpt or .tmp are the ones qlp-compress "
                         "gives its working files beside an output; choose another file name")
    for path in (out, *written):
        if _in_work(path):
            raise UsageError(f"--out {out} would write {path} inside an output folder's {WORK}/, where qlp-compress "
                             f"keeps a run's working files; choose another --out")
        for source in inputs:
            if source is not None and same_file(path, source):
                what = f"--out {out} is" if path == out else f"--out {out} would write {path} over"
                raise UsageError(f"{what} the input {source}; no command writes over its input, --force or not: "
                                 "choose another --out")
    name_max = _name_max(out.parent)
    need = max(len(os.fsencode(p.name)) for p in (out, *written)) + _TEMPORARY_OVERHEAD
    if need > name_max:
        allowed = name_max - (need - len(os.fsencode(out.name)))
        raise UsageError(f"--out name {out.name[:40]}... is too long: with the hidden working files written beside "
                         f"it (.NAME.*.tmp, {file_checkpoint(Path('NAME')).name}) a name needs {need} bytes, over "
                         f"the file system's {name_max}; choose a name of at most {max(allowed, 1)} bytes")


def check_folder_out(out: Path, inputs: Sequence[Path | None] = ()) -> None:
    """Refuse a folder --out that is the tool's working folder, or where the run would replace an input (an
    output's name in OUT, or anything under OUT/.work)."""
    if _in_work(out):
        raise UsageError(f"--out {out} is inside an output folder's {WORK}/, where qlp-compress keeps a run's "
                         "working files; choose another --out")
    work = (out / WORK).resolve()
    for source in inputs:
        if source is None:
            continue
        if work in source.resolve().parents:
            raise UsageError(f"the input {source} is inside {out / WORK}, the run's working folder; copy it "
                             "elsewhere first, or choose another --out")
        hit = next((n for n in (*OUTPUT_NAMES, MANIFEST) if same_file(out / n, source)), None)
        if hit is not None:
            raise UsageError(f"--out {out} would replace the input {source} with the run's {hit}; no command "
                             "writes over its input, --force or not: choose another --out")


def owned_outputs(out: Path) -> set[str]:
    """The output files OUT's record says the tool wrote there; none when there is no readable record."""
    path = out / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > 1 << 16:
            return set()
        files = json.loads(path.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in files if isinstance(n, str) and n in OUTPUT_NAMES} if isinstance(files, list) else set()


def in_the_way(out: Path, names: Iterable[str]) -> list[str]:
    """Those of `names` that exist in OUT but that the tool did not write there (see owned_outputs)."""
    owned = owned_outputs(out)
    return [n for n in names if os.path.lexists(out / n) and n not in owned]


def refuse_in_the_way(out: Path, names: list[str], then: str = "") -> None:
    if names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise UsageError(f"{out} holds {shown}, which qlp-compress did not write there (its record of what it wrote "
                         f"is {out / MANIFEST}); --force replaces only those: move {shown} away{then}, or choose "
                         "another --out")


def read_journal(out: Path) -> tuple[list[str], list[str]] | None:
    """OUT/.work/commit.json, the list a run writes before it puts its files in place: (new files, previous
    files they replace); None when there is none. A damaged one is refused, naming the fix."""
    work = out / WORK
    path = work / "commit.json"
    if not os.path.lexists(path):
        return None
    allowed = (*OUTPUT_NAMES, MANIFEST)
    try:
        doc = json.loads(path.read_text()) if path.is_file() and path.stat().st_size < 1 << 16 else None
        new, replace = doc["new"], doc.get("replace", [])
        if all(isinstance(x, list) and all(n in allowed for n in x) for x in (new, replace)):
            return list(new), list(replace)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    raise QLPError(f"{path} is damaged, so which files an interrupted run was putting in place is unknown: its new "
                   f"files are in {work / 'out'} and the previous ones in {work / 'old'}; move the ones you want "
                   f"into {out}, then delete {work} and rerun")


def check_work(out: Path) -> tuple[list[str], list[str]] | None:
    """Refuse an OUT/.work that holds what the tool did not write (or a damaged commit.json), before anything in
    it is touched; returns the journal of a swap to finish, if any."""
    work = out / WORK
    journal = read_journal(out)
    own = (*OUTPUT_NAMES, MANIFEST)
    for folder in (work / "out", work / "old"):
        try:
            names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        except OSError as e:
            raise QLPError(f"cannot read {folder} ({e.strerror}); fix its permissions, or choose another --out") from e
        if folder.name == "old" and journal is None and names:
            raise QLPError(f"{folder} holds files a failed run could not put back ({', '.join(names[:4])}); move "
                           f"them back into {out} or away, then rerun")
        foreign = [n for n in names if not is_own(n, own)]
        if foreign:
            raise QLPError(f"{folder} holds {', '.join(foreign[:4])}, which qlp-compress did not write; move them "
                           f"out of {work}, then rerun")
    return journal
