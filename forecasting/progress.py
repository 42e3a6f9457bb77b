"""Progress bars for a person at a terminal; silent under a scheduler, in CI or in a log file.

One rich Progress display per run (rich allows one live display at a time): a bar over the
run's stages, and under it a bar per network in training with its train and validation loss.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

EpochCallback = Callable[[str, int, float, float], None]

_active: Progress | None = None  # the display of the run in progress, if any


def interactive() -> bool:
    return sys.stderr.isatty()


def _display() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), transient=True)


@contextmanager
def stages(label: str, total: int) -> Iterator[Callable[[str], None]]:
    """A bar over a run's stages; call the yielded function as each stage starts."""
    global _active
    if not interactive() or _active is not None:
        yield lambda stage: None
        return
    with _display() as display:
        _active = display
        task = display.add_task(label, total=total, detail="")
        started = False

        def advance(stage: str) -> None:
            nonlocal started
            display.update(task, advance=1 if started else 0, detail=stage)
            started = True

        try:
            yield advance
        finally:
            _active = None


@contextmanager
def epochs(label: str, total: int) -> Iterator[EpochCallback | None]:
    """An epoch bar (train and validation loss beside it) while a model trains; None when no TTY."""
    if not interactive() or total <= 0:
        yield None
        return
    if _active is not None:
        task = _active.add_task(label, total=total, detail="")
        try:
            yield _epoch_callback(_active, task)
        finally:
            _active.remove_task(task)
        return
    with _display() as display:
        yield _epoch_callback(display, display.add_task(label, total=total, detail=""))


def _epoch_callback(display: Progress, task: TaskID) -> EpochCallback:
    def on_epoch(model: str, epoch: int, train_loss: float, val_loss: float) -> None:
        display.update(task, advance=1, detail=f"train {train_loss:.4f} val {val_loss:.4f}")

    return on_epoch
