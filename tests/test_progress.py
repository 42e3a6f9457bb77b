"""Progress bars show at a terminal and stay silent elsewhere."""

from __future__ import annotations

import pytest

from forecasting import progress


def test_silent_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: False)
    with progress.epochs("sales gru", 3) as on_epoch:
        assert on_epoch is None


def test_epoch_bar_advances_at_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: True)
    displays = []
    real = progress._display
    monkeypatch.setattr(progress, "_display", lambda: displays.append(real()) or displays[-1])
    with progress.epochs("sales gru", 2) as on_epoch:
        assert on_epoch is not None and len(displays) == 1
        (task,) = displays[0].tasks
        on_epoch("gru", 0, 0.5, 0.6)
        on_epoch("gru", 1, 0.4, 0.5)
        assert (task.description, task.total, task.completed) == ("sales gru", 2, 2)
        assert task.fields["detail"] == "train 0.4000 val 0.5000"


def test_epoch_bars_nest_under_the_stage_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: True)
    with progress.stages("sales nightly", 2) as on_stage:
        on_stage("load")
        display = progress._active
        assert display is not None and len(display.tasks) == 1
        with progress.epochs("sales gru", 2) as on_epoch:
            assert on_epoch is not None and len(display.tasks) == 2
            on_epoch("gru", 0, 0.5, 0.6)
            assert display.tasks[1].completed == 1
        assert len(display.tasks) == 1  # the finished network's bar is gone
        on_stage("backtest:gru")
        assert display.tasks[0].completed == 1
    assert progress._active is None
