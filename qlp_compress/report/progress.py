"""Progress on stderr: the search's episodes and training's epochs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qlp_compress.base.messages import console


@contextlib.contextmanager
def training_progress(title: str) -> Iterator[Callable[[dict], None]]:
    """A progress bar for `finetune.train`'s on_step records: epoch, loss, accuracy, ETA."""
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
