"""Flow runs that end without waiting out Prefect's heartbeat thread.

Prefect (3.9) sends a flow run's heartbeats, by which its server detects crashed runs, from a
daemon thread that sleeps in 1 s steps between them (every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
seconds, 180 by default). When a sync flow ends, its engine sets the thread's stop event and then
joins it, so every flow run waits for the rest of the thread's current 1 s sleep: 0.76 s median
of a 50 s sales night (benchmarks/overhead.py, 2026-12-07), paid again by every night of a
backfill. Prefect's async engine already leaves the thread to stop on its own
(`join_on_exit=False`): once its stop event is set it emits no other heartbeat and returns when
that sleep ends. `install` has the sync engine do the same. The heartbeats themselves, and
whether and how often they are sent, stay Prefect's.

It replaces `prefect.flow_engine._send_heartbeats`, which the engine looks up in its module at
every flow run, by a wrapper that passes `join_on_exit=False` to Prefect's own. Where that
function is missing or takes no `join_on_exit` (another Prefect version), nothing is replaced
and flow runs wait as before.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_MARK = "_forecasting_without_join"


def install() -> bool:
    """Make sync flow runs end without joining their heartbeat thread; True if in place."""
    from prefect import flow_engine

    send = getattr(flow_engine, "_send_heartbeats", None)
    if send is None:
        log.debug("prefect.flow_engine has no _send_heartbeats: flow runs' ends left as they are")
        return False
    if getattr(send, _MARK, False):
        return True
    try:
        takes_join = "join_on_exit" in inspect.signature(send).parameters
    except (TypeError, ValueError):
        takes_join = False
    if not takes_join:
        log.debug("prefect.flow_engine._send_heartbeats takes no join_on_exit: flow runs' ends left as they are")
        return False
    flow_engine._send_heartbeats = _without_join(send)
    return True


def _without_join(send: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(send)
    def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Any:
        return send(engine, join_on_exit=False)

    setattr(send_heartbeats, _MARK, True)
    return send_heartbeats
