"""Baseline forecasts: naive, seasonal naive, exponential smoothing (ETS).

Each single-series function maps a history (1-D array, oldest first) to `horizon` future
values; the `_many` functions forecast every series of a panel at once (naive and seasonal
naive as array lookups, ETS one statsmodels fit per series, in worker processes when there
are many). They are wrapped into Forecasters in forecasting.forecasters, with the same
interface as the networks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait

import numpy as np

from forecasting.config import SettingError
from forecasting.stopping import TaskReleased, raise_if_released

log = logging.getLogger(__name__)

PARALLEL_MIN_SERIES = 1000  # below this, spawning workers (2-3 s each: numpy, scipy, statsmodels)
#   costs more than it saves: 608 monthly series took 4.2 s in one process, 5.3-9.7 s in two
RELEASE_POLL_S = 0.5  # how soon fits in worker processes stop once their Dask task is released
WORKERS_ENV = "FORECASTING_WORKERS"  # processes for ETS fits; default: the CPUs this process may use
_ETS_MEMO: OrderedDict[tuple, np.ndarray] = OrderedDict()  # identical history -> identical forecast
_ETS_MEMO_SIZE = 50_000
# Histories shorter than this many seasons, or points, choose their ETS model by AICc.
SELECT_BELOW_SEASONS, SELECT_BELOW_POINTS = 4, 30


def naive(history: np.ndarray, horizon: int) -> np.ndarray:
    """The last value, repeated."""
    return np.repeat(float(history[-1]), horizon)


def seasonal_naive(history: np.ndarray, horizon: int, season_length: int) -> np.ndarray:
    """The last season, repeated; naive when the history is shorter than one season."""
    if len(history) < season_length:
        return naive(history, horizon)
    last = np.asarray(history[-season_length:], float)
    return last[np.arange(horizon) % season_length]


def ets(history: np.ndarray, horizon: int, season_length: int, *, series_id: str = "?") -> np.ndarray:
    """Holt-Winters with an additive damped trend and additive seasonality.

    Positive series are modelled on the log scale (multiplicative seasonality and trend, fitted
    stably as additive in logs). Two full seasons are needed for the seasonal part. Histories
    under SELECT_BELOW_SEASONS seasons + 2 points (or SELECT_BELOW_POINTS points) take whichever
    of damped trend with season, damped trend, season and level alone has the lowest AICc; under
    10 points, the level alone. If statsmodels fails, the series falls back to seasonal naive - a baseline must
    always forecast.
    """
    forecast, failed = _ets(history, horizon, season_length, series_id=series_id)
    if failed:
        log.warning("ETS failed for series %r; using seasonal naive", series_id)
    return forecast


def _ets(history: np.ndarray, horizon: int, season_length: int, *, series_id: str) -> tuple[np.ndarray, bool]:
    y = np.asarray(history, float)
    log_scale = bool((y > 0).all())
    x = np.log(y) if log_scale else y
    seasonal = season_length > 1 and len(y) >= 2 * season_length + 2
    damped = {"trend": "add", "damped_trend": True, "seasonal": "add" if seasonal else None,
              "seasonal_periods": season_length if seasonal else None}
    trend = {"trend": "add", "damped_trend": True, "seasonal": None}
    level = {"trend": None, "seasonal": None}
    season = {"trend": None, "seasonal": "add", "seasonal_periods": season_length}
    if len(y) < 10:
        attempts = [[level]]
    elif len(y) < max(SELECT_BELOW_SEASONS * season_length + 2, SELECT_BELOW_POINTS):
        # A short history: a trend (and a season) estimated from a few dozen points can run away
        # (on 13 points of noise the damped trend forecast 25x the history's maximum), so the
        # models compete on AICc, which weighs their extra parameters, and the level alone may win.
        # The trend alone competes too: with its season's parameters a trend model rarely wins
        # on 2-4 seasons, and a trending series was forecast flat.
        attempts = [[damped, trend, season, level] if seasonal else [damped, level]]
    else:
        # Long histories take the first model that fits, in this order: recorded accuracy on
        # aus_retail is with it, and AICc there would change half its series' models at three
        # fits each.
        attempts = [[damped], [season], [level]] if seasonal else [[damped], [level]]
    for candidates in attempts:
        fits = [fit for fit in (_fit_ets(x, kwargs, horizon, log_scale, series_id) for kwargs in candidates) if fit]
        if fits:
            return min(fits, key=lambda fit: fit[0])[1], False
    return seasonal_naive(y, horizon, season_length), True


def _fit_ets(x: np.ndarray, kwargs: dict, horizon: int, log_scale: bool,
             series_id: str) -> tuple[float, np.ndarray] | None:
    """(AICc, forecast) of statsmodels' Holt-Winters with `kwargs` fitted to `x`, the forecast
    back on the data's scale; None if the fit fails or its forecast is not finite."""
    from statsmodels.tools.sm_exceptions import ConvergenceWarning
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    # Initial states from the first seasons (heuristic) and no brute-force grid before the
    # optimiser: on aus_retail 9x faster than estimating the states too, and no less
    # accurate (mean MASE 0.94 against 0.98 on the last 12 months, 0.99 against 1.00 on the
    # 12 before). "estimated" stays as the fallback for histories too short for it.
    for init in ("heuristic", "estimated"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                warnings.simplefilter("ignore", RuntimeWarning)
                fit = ExponentialSmoothing(x, initialization_method=init, **kwargs).fit(use_brute=False)
                forecast = np.asarray(fit.forecast(horizon), float)
                forecast = np.exp(forecast) if log_scale else forecast
            if np.isfinite(forecast).all():
                return (fit.aicc if np.isfinite(fit.aicc) else np.inf), forecast
        except (ValueError, np.linalg.LinAlgError) as exc:
            log.debug("ETS %s (%s) failed for series %r: %s", kwargs, init, series_id, exc)
    return None


# ----------------------------------------------------------------------------- many series


def naive_many(values: np.ndarray, ends: np.ndarray, horizon: int) -> np.ndarray:
    """naive() of every series: `values` holds the series one after another, series i ending
    before ends[i]. Returns [series, horizon]."""
    return np.repeat(values[ends - 1].astype(float)[:, None], horizon, axis=1)


def seasonal_naive_many(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, horizon: int,
                        season_length: int) -> np.ndarray:
    """seasonal_naive() of every series (naive for a series shorter than one season): [series, horizon]."""
    steps = np.arange(horizon) % season_length  # [horizon]
    index = ends[:, None] - season_length + steps[None, :]  # [series, horizon]
    short = (ends - starts) < season_length
    index[short] = (ends[short] - 1)[:, None]
    return values[index].astype(float)


def workers() -> int:
    """Processes for per-series fits: $FORECASTING_WORKERS, else 1 in a Dask worker's task, else the
    CPUs this process may use."""
    raw = os.environ.get(WORKERS_ENV)
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:  # a SettingError: the CLI names the variable, not the config file, and checks it first
            raise SettingError(f"`{WORKERS_ENV}` ({raw!r}) must be an integer >= 1")
        return n
    if _in_dask_worker():  # the cluster's worker processes are the parallelism: one shard each
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _in_dask_worker() -> bool:
    """Whether this runs in a Dask worker's task. There, worker processes of its own would
    multiply each worker by the cores: a worker started without a nanny is no daemon, so
    nothing else stops it from spawning them."""
    distributed = sys.modules.get("distributed")  # not imported: not on a worker
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def ets_many(histories: Sequence[np.ndarray], horizon: int, season_length: int, *,
             series_ids: Sequence[str], n_workers: int | None = None) -> np.ndarray:
    """ets() of every history: [series, horizon], identical to calling ets() on each.

    A history seen before in this process (same values, horizon and season) reuses its forecast:
    a night forecasts the same panel when the champion is registered and when it is written.
    The rest are fitted in `n_workers` processes (default workers()) when there are at least
    PARALLEL_MIN_SERIES of them, in this process otherwise. The workers are spawned, so a
    script that gets here must guard its entry point (`if __name__ == "__main__":`), as for any
    spawn-based multiprocessing; the `forecasting` CLI, Prefect and pytest do.
    """
    out = np.empty((len(histories), horizon))
    keys = [(horizon, season_length, hashlib.blake2b(np.ascontiguousarray(h, float).tobytes(),
                                                     digest_size=16).digest()) for h in histories]
    todo = []
    for i, key in enumerate(keys):
        hit = _ETS_MEMO.get(key)
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit
    n_workers = workers() if n_workers is None else n_workers
    jobs = [(np.asarray(histories[i], float), str(series_ids[i])) for i in todo]
    results = None
    if n_workers > 1 and len(jobs) >= PARALLEL_MIN_SERIES:
        results = _ets_in_processes(jobs, horizon, season_length, n_workers)
    if results is None:
        results = _ets_chunk(jobs, horizon, season_length)
    for i, (forecast, failed) in zip(todo, results):
        if failed:
            log.warning("ETS failed for series %r; using seasonal naive", series_ids[i])
        out[i] = forecast
        _ETS_MEMO[keys[i]] = forecast
        if len(_ETS_MEMO) > _ETS_MEMO_SIZE:
            _ETS_MEMO.popitem(last=False)
    return out


def _ets_chunk(jobs: Sequence[tuple[np.ndarray, str]], horizon: int,
               season_length: int) -> list[tuple[np.ndarray, bool]]:
    """ets() of each (history, series_id); whether it fell back to seasonal naive.

    BLAS runs on one thread meanwhile: the optimiser's tiny matrices gain nothing from more,
    and on a busy machine OpenBLAS's thread hand-offs made each fit 2-5x slower (same result).
    """
    with _one_blas_thread():
        return [_ets_unless_released(history, horizon, season_length, series_id=series_id)
                for history, series_id in jobs]


def _ets_unless_released(history: np.ndarray, horizon: int, season_length: int, *,
                         series_id: str) -> tuple[np.ndarray, bool]:
    raise_if_released()  # a shard on a Dask worker stops between series once its night has ended
    return _ets(history, horizon, season_length, series_id=series_id)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own thread count
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _ets_in_processes(jobs: list[tuple[np.ndarray, str]], horizon: int, season_length: int,
                      n_workers: int) -> list[tuple[np.ndarray, bool]] | None:
    """_ets_chunk over `n_workers` fresh processes (spawned: safe beside torch's and Prefect's
    threads); None when processes cannot be started here (e.g. inside a daemon process)."""
    n_chunks = min(len(jobs), 4 * n_workers)  # a few chunks per worker evens out slow series
    bounds = np.linspace(0, len(jobs), n_chunks + 1).astype(int)
    try:
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("spawn"))
    except (OSError, AssertionError, RuntimeError) as exc:  # daemonic parent, no /dev/shm, ...
        log.info("ETS in one process: worker processes unavailable (%s)", exc)
        return None
    finished = False
    try:
        futures = [pool.submit(_ets_chunk, jobs[a:b], horizon, season_length)
                   for a, b in zip(bounds[:-1], bounds[1:])]
        _wait_unless_released(futures)
        results = [result for future in futures for result in future.result()]
        finished = True
        return results
    except (OSError, AssertionError, RuntimeError) as exc:  # e.g. a spawned process failed its start
        if isinstance(exc, TaskReleased):
            raise
        log.info("ETS in one process: worker processes unavailable (%s)", exc)
        return None
    finally:
        if finished:
            pool.shutdown()
        else:  # released, failed or interrupted: what still runs is of no use
            _stop_pool(pool)


def _wait_unless_released(futures: Sequence[Future]) -> None:
    """Wait for `futures`, looking every RELEASE_POLL_S whether this thread's Dask task was
    released: the fitting processes cannot look themselves."""
    pending = set(futures)
    while pending:
        raise_if_released()
        done, pending = wait(pending, timeout=RELEASE_POLL_S, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:  # raised now: reading results in order would wait
                raise future.exception()  # for the chunks before it, without looking


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Drop the queued chunks and end the fitting processes now: a fit holds nothing to lose."""
    terminate_workers = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate_workers is not None:
        terminate_workers()
        return
    # What terminate_workers() does: shutdown() forgets the processes, so take them first
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(ValueError, ProcessLookupError):  # closed, or already gone
            if process.is_alive():
                process.terminate()
