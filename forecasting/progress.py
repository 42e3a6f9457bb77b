"""Progress bars for a person at a terminal; silent under a scheduler, in CI or in a log file."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

EpochCallback = Callable[[str, int, float, float], None]


def interactive() -> bool:
    return sys.stderr.isatty()


@contextmanager
def epochs(label: str, total: int) -> Iterator[EpochCallback | None]:
    """An epoch bar (train and validation loss beside it) while a model trains; None when no TTY."""
    if not interactive():
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[losses]}"), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total, losses="")

        def on_epoch(model: str, epoch: int, train_loss: float, val_loss: float) -> None:
            bar.update(task, advance=1, losses=f"train {train_loss:.4f} val {val_loss:.4f}")

        yield on_epoch
