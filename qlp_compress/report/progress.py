"""Progress on stderr: the search's episodes and training's epochs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(title, total=None, epoch="-", loss=0.0, acc=0.0)

        def on_step(r: dict) -> None:
            progress.update(task, completed=r["step"], total=r["steps"], epoch=f"{r['epoch']}/{r['epochs']}",
                            loss=r["loss"], acc=r["accuracy"])

        yield on_step


@contextlib.contextmanager
def search_progress(title: str, episodes: int) -> Iterator[Callable[[dict], None]]:
    """A live line for `run_search`'s on_episode records: stage, episode, ε, last and best reward, ETA."""
    if messages.quiet or not console.is_terminal:
        with (_silent() if messages.quiet else _plain_lines(title, lambda r: (
                f"episode {r['episode']}/{episodes}, stage {r['stage']}/{r['stages']} at target {r['target']:.3f}, "
                f"exploration ε {r['epsilon']:.2f}, reward {r['reward']:.3f}, best of stage {r['best']:.3f}"))) \
                as on_episode:
            yield on_episode
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("stage {task.fields[stage]}  ε {task.fields[eps]:.2f}  "
                          "last {task.fields[last]:.3f}  best {task.fields[best]:.3f}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=episodes, stage="-", eps=1.0, last=0.0, best=0.0)

        def on_episode(r: dict) -> None:
            progress.update(task, completed=r["episode"], stage=f"{r['stage']}/{r['stages']} @ {r['target']:.3f}",
                            eps=r["epsilon"], last=r["reward"], best=max(r["best"], -1.0))

        yield on_episode
