"""Progress on stderr: the search's episodes, training's epochs, and every other phase that takes seconds (import,
export, verification, measurement). `set_quiet(True)` silences all of it (the CLI's --quiet); warnings and errors
still print."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from qlp_compress.base import messages
from qlp_compress.base.messages import console

PLAIN_EVERY_SECONDS = 5.0  # outside a terminal: one plain progress line at most this often


@contextlib.contextmanager
def _plain_lines(title: str, line: Callable[[dict], str]) -> Iterator[Callable[[dict], None]]:
    """Outside a terminal a live bar would be cut or repeated: one plain line every few seconds, and the last."""
    last = [0.0, None]

    def on_record(r: dict) -> None:
        last[1] = r
        now = time.monotonic()
        if now - last[0] >= PLAIN_EVERY_SECONDS:
            last[0] = now
            console.print(f"{title}: {line(r)}", highlight=False, soft_wrap=True)

    yield on_record
    if last[1] is not None:
        console.print(f"{title}: {line(last[1])} (done)", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _silent() -> Iterator[Callable[[dict], None]]:
    yield lambda r: None
_depth = 0  # phases open now: only the outermost one shows
SHOW_AFTER_S = 2.0  # outside a terminal, a phase is announced once it has run this long


def set_quiet(quiet: bool = True) -> None:
    """Silence (or restore) every progress display: phases, search and training bars (the CLI's --quiet)."""
    messages.set_quiet(bool(quiet))


def is_quiet() -> bool:
    return messages.quiet


@contextlib.contextmanager
def phase(title: str) -> Iterator[None]:
    """One step of a command that takes a few seconds (import, export, measurement, …).

    In a terminal: a transient spinner with the elapsed time, gone when the step ends. Outside one: a plain line
    `title …` once the step has run SHOW_AFTER_S seconds, and `title: 12.3 s` when it ends (a step that ends
    sooner, or fails, adds no line: an error stays the only line on stderr). Silent when quiet, and inside another
    phase (only the outermost one shows)."""
    global _depth
    if messages.quiet or _depth:
        yield
        return
    _depth += 1
    try:
        with _shown(title):
            yield
    finally:
        _depth -= 1


@contextlib.contextmanager
def _shown(title: str) -> Iterator[None]:
    started = time.perf_counter()
    if console.is_terminal:
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                            transient=True)
        try:
            progress.start()
        except LiveError:  # another display is live: it already tells the user something is running
            yield
            return
        try:
            progress.add_task(title, total=None)
            yield
        finally:
            progress.stop()
        return
    state = {"shown": False, "over": False}
    lock = threading.Lock()

    def announce() -> None:
        with lock:
            if not state["over"]:
                console.print(f"{title} …", highlight=False, markup=False, soft_wrap=True)
                state["shown"] = True

    timer = threading.Timer(SHOW_AFTER_S, announce)
    timer.daemon = True
    if SHOW_AFTER_S <= 0:
        announce()
    else:
        timer.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        timer.cancel()
        with lock:
            state["over"] = True
        if finished and state["shown"]:
            console.print(f"{title}: {time.perf_counter() - started:.1f} s", highlight=False, markup=False,
                          soft_wrap=True)


@contextlib.contextmanager
def training_progress(title: str) -> Iterator[Callable[[dict], None]]:
    """A progress bar for `finetune.train`'s on_step records: epoch, loss, accuracy, ETA."""
    if messages.quiet or not console.is_terminal:
        with (_silent() if messages.quiet else _plain_lines(title, lambda r: (
                f"step {r['step']}/{r['steps']}, epoch {r['epoch']}/{r['epochs']}, loss {r['loss']:.4f}, "
                f"accuracy {r['accuracy']:.2%}"))) as on_step:
            yield on_step
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=messages.quiet) as progress:
        task = progress.add_task(title, total=None, epoch="-", loss=0.0, acc=0.0)

        def on_step(r: dict) -> None:
            progress.update(task, completed=r["step"], total=r["steps"], epoch=f"{r['epoch']}/{r['epochs']}",
                            loss=r["loss"], acc=r["accuracy"])

        yield on_step


def _reward(x: float | None) -> str:
    return "-" if x is None or x == -float("inf") else f"{x:.3f}"


@contextlib.contextmanager
def search_progress(title: str, episodes: int) -> Iterator[Callable[[dict], None]]:
    """A live line for `run_search`'s on_episode records: stage, exploration rate, the last reward, the best of the
    current stage and the best of the whole search, ETA. "best overall" is the highest reward of any stage (an
    earlier stage's target is lower, so its rewards are usually higher); "stage best" restarts with each stage."""
    rate = _rate()
    if messages.quiet or not console.is_terminal:
        with (_silent() if messages.quiet else _plain_lines(title, lambda r: (
                f"episode {r['episode']}/{episodes}, stage {r['stage']}/{r['stages']} at target {r['target']:.3f}, "
                f"explore ε {r['epsilon']:.2f}, last {_reward(r['reward'])}, stage best {_reward(r['best'])}"
                + (f", {r['rate']}" if r["rate"] else "")))) as on_record:
            yield lambda r: on_record({**r, "rate": rate(r["episode"])})  # the rate when the episode ended
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("stage {task.fields[stage]}  explore ε {task.fields[eps]}  last {task.fields[last]}  "
                          "stage best {task.fields[best]}  best overall {task.fields[overall]}  {task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=messages.quiet) as progress:
        task = progress.add_task(title, total=episodes, stage="-", eps="-", last="-", best="-", overall="-", rate="")
        overall = [-float("inf")]

        def on_episode(r: dict) -> None:
            overall[0] = max(overall[0], r["best"])
            eps = "demo" if r.get("demonstration") else f"{r['epsilon']:.2f}"
            progress.update(task, completed=r["episode"], stage=f"{r['stage']}/{r['stages']} @ {r['target']:.3f}",
                            eps=eps, last=_reward(r["reward"]), best=_reward(r["best"]), overall=_reward(overall[0]),
                            rate=rate(r["episode"]))

        yield on_episode


def _rate() -> Callable[[int], str]:
    """episode number → "N episodes/s" since the first episode this display saw (a resumed search's included)."""
    start: list = []

    def rate(episode: int) -> str:
        now = time.monotonic()
        if not start:
            start.extend((now, episode))
            return ""
        return f"{(episode - start[1]) / max(now - start[0], 1e-9):.2f} episodes/s"

    return rate
