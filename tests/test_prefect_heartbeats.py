"""A flow run ends without waiting for Prefect's heartbeat thread (forecasting.prefect_heartbeats),
and still sends its heartbeats."""

from __future__ import annotations

import threading
import time
from typing import Any

import prefect.flow_engine as flow_engine
import pytest
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

import flows.nightly  # noqa: F401  installs it, as in every process that runs the flows
from forecasting import prefect_heartbeats


@pytest.mark.usefixtures("prefect")
def test_a_flow_run_ends_without_joining_its_heartbeat_thread_which_stops_by_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    beating: list[threading.Thread] = []
    joined: list[threading.Thread] = []
    first_sent, sleep_over = threading.Event(), threading.Event()

    class HeldSleep:  # the heartbeat thread's 1 s sleeps last until the test lets them end
        def sleep(self, seconds: float) -> None:
            if threading.current_thread() in beating:
                sleep_over.wait(timeout=30)
            else:
                time.sleep(seconds)

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    real_emit = flow_engine.FlowRunEngine._emit_flow_run_heartbeat

    def recording_emit(self: Any, *args: Any, **kwargs: Any) -> None:
        real_emit(self, *args, **kwargs)
        thread = threading.current_thread()
        real_join = thread.join
        thread.join = lambda timeout=None: (joined.append(thread), real_join(0))  # type: ignore[method-assign]
        beating.append(thread)
        first_sent.set()

    monkeypatch.setattr(flow_engine, "time", HeldSleep())
    monkeypatch.setattr(flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", recording_emit)

    @flow
    def short() -> bool:
        return first_sent.wait(timeout=30)  # the run's end comes after its first heartbeat

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        assert short() is True
    assert len(beating) == 1 and beating[0].is_alive()  # still in its sleep: nothing waited for it
    assert joined == [], "the flow run's end joined its heartbeat thread (waiting out its sleep)"
    sleep_over.set()
    threading.Thread.join(beating[0], timeout=5)  # the real join, not the recording one
    assert not beating[0].is_alive(), "the stopped heartbeat thread did not end by itself"
    assert len(beating) == 1, "a heartbeat was sent after the flow run ended"


def test_install_leaves_a_prefect_without_join_on_exit_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    def other_version(engine: Any) -> None:
        return None

    monkeypatch.setattr(flow_engine, "_send_heartbeats", other_version)
    assert prefect_heartbeats.install() is False
    assert flow_engine._send_heartbeats is other_version


def test_install_twice_wraps_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def send(engine: Any, join_on_exit: bool = True) -> None:
        seen.append(join_on_exit)

    monkeypatch.setattr(flow_engine, "_send_heartbeats", send)
    assert prefect_heartbeats.install() and prefect_heartbeats.install()
    flow_engine._send_heartbeats(object())
    assert seen == [False]
