"""A flow run ends without waiting for Prefect's heartbeat thread (forecasting.prefect_heartbeats),
and still sends its heartbeats."""

from __future__ import annotations

import threading
from typing import Any

import prefect.flow_engine as flow_engine
import pytest
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

import flows.nightly  # noqa: F401  installs it, as in every process that runs the flows
from forecasting import prefect_heartbeats


@pytest.mark.usefixtures("prefect")
def test_a_flow_run_ends_while_its_stopped_heartbeat_thread_finishes_its_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    beating: list[threading.Thread] = []
    first_sent = threading.Event()
    real_emit = flow_engine.FlowRunEngine._emit_flow_run_heartbeat

    def recording_emit(self: Any, *args: Any, **kwargs: Any) -> None:
        real_emit(self, *args, **kwargs)
        beating.append(threading.current_thread())
        first_sent.set()

    monkeypatch.setattr(flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", recording_emit)

    @flow
    def short() -> bool:
        return first_sent.wait(timeout=30)  # the run's end comes after its first heartbeat

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        assert short() is True
    # The thread sleeps in 1 s steps: joined at the run's end, as Prefect does, it would be over.
    assert len(beating) == 1 and beating[0].is_alive()
    beating[0].join(timeout=5)
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
