"""The entry point: old option spellings rewritten (with a one-line note), and every failure turned into one line on
stderr (no traceback unless --debug) with its exit code: 1, 2 for usage errors (ours and Typer's), 130 when Ctrl-C
or SIGTERM stopped the run."""

from __future__ import annotations

import atexit
import signal
import sys
import traceback

import typer
from rich.markup import escape

from qlp_compress.base.errors import QLPError, os_error_line
from qlp_compress.base.interrupts import sigterm_as_interrupt
from qlp_compress.base.messages import console
from qlp_compress.cli import files, optimize_command  # noqa: F401  (register finetune, export, quantize, train; optimize)
from qlp_compress.cli.commands import app
from qlp_compress.cli.options import RENAMED

RESUMABLE = ("search", "prune", "compare", "finetune", "train", "optimize")  # the commands with --resume


def renamed(args: list[str]) -> list[str]:
    """Old spellings → the current ones, each with a one-line note on stderr (kept for one release)."""
    command = next((a for a in args if not a.startswith("-")), "")
    table = {**RENAMED[""], **RENAMED.get(command, {})}
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in table and arg != command:
            new = table[name]
            console.print(f"note: {name} is deprecated; use {new or 'nothing (it is the default)'}"
                          " (the old spelling will be removed in the next release)",
                          highlight=False, soft_wrap=True)
            out.extend((new.split() if new else []) + ([value] if eq else []))
        else:
            out.append(arg)
    return out


def main() -> None:
    args = sys.argv[1:]
    end = args.index("--") if "--" in args else len(args)
    debug = "--debug" in args[:end]
    if debug:  # accepted before and after the command name: Typer knows it only before
        args = [a for a in args[:end] if a != "--debug"] + args[end:]
    try:
        args = renamed(args)
        with sigterm_as_interrupt():
            code = app(args=["--debug", *args] if debug else args, standalone_mode=False)
    except typer.TyperException as e:  # Typer's usage errors: a bad option value, a missing argument, ...
        if type(e).__name__ == "NoArgsIsHelpError":  # no command: the help text was shown
            sys.exit(e.exit_code)
        command = getattr(getattr(e, "ctx", None), "command_path", "qlp-compress")
        _fail(f"{e.format_message().rstrip('.')}; fix the command line (see '{command} --help')",
              getattr(e, "exit_code", 2), debug)
    except QLPError as e:
        _fail(str(e), e.exit_code, debug)
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        _fail(_interrupted(args), 130, debug)
    except MemoryError:
        _fail("out of memory; ask for less (a smaller model, data set, --episodes or batch) or use a machine with "
              "more memory", 1, debug)
    except OSError as e:  # a full disk, the file size limit, a name too long: the user can act on these
        _fail(os_error_line(e) or _unexpected(e), 1, debug)
    except Exception as e:  # an unexpected failure: still one line, unless --debug
        _fail(_unexpected(e), 1, debug)
    if code == 130:  # Typer turns a KeyboardInterrupt outside our handlers into exit code 130, silently
        _ignore_further_interrupts()
        _fail(_interrupted(args), 130, False)
    sys.exit(code if isinstance(code, int) else 0)


def _ignore_further_interrupts() -> None:
    """The run is already stopping: a second Ctrl-C (or the SIGINT a terminal sends to every process of a
    multi-process run reaching this one again) must not print a traceback from an exit handler (torch's run at
    interpreter exit). Registered at exit, not set now: the tests call main() in their own process."""
    atexit.register(lambda: [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)])


def _unexpected(e: BaseException) -> str:
    first = next((line for line in str(e).splitlines() if line.strip()), "")[:300]
    return f"unexpected {type(e).__name__}: {first} (rerun with --debug for details, and report it)"


def _interrupted(args: list[str]) -> str:
    command = next((a for a in args if not a.startswith("-")), "")
    if command in RESUMABLE:
        return "interrupted; rerun the same command with --resume to continue from its last checkpoint"
    return "interrupted; rerun the command"


def _fail(message: str, code: int, debug: bool) -> None:
    """Print `message` as one line on stderr (the traceback first with --debug) and exit with `code`."""
    if debug:
        traceback.print_exc()
    console.print(f"[red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(code)
