"""What the training probes share: timing real training steps, and keeping what they measured
for every process on the machine.

A probe (forecasting.precision_probe, forecasting.thread_probe) answers a question about this
machine that only a measurement settles: which precision, how many threads train fastest. Its
answer goes to a JSON file in the cache directory (fused_cells.cache_dir()), one entry per key
(the CPU model, torch's version and the conditions measured), written under a file lock: one
process on a machine measures while any other that asks meanwhile waits for its answer, and
every later night, and each Dask worker on the machine, reads it. So they all train alike. The
file holds the machine's load average when each answer was measured: an answer measured on a
busy machine (a first night beside another) may be worth measuring again, by deleting the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ContextManager

import torch
from filelock import FileLock
from torch import nn

from forecasting import fused_cells
from forecasting.models import NetConfig, RecurrentNet

LOCK_TIMEOUT_S = 120  # a measurement takes seconds; a lock held longer is a stuck process's


class AnswerNotKept(Exception):
    """No answer can be kept in the cache directory for other processes (read-only, or its lock
    held past LOCK_TIMEOUT_S): the caller decides without measuring, since an answer only this
    process knew could differ from another process's of the same night."""


def remembered(file: str, key: str, measure: Callable[[], dict[str, Any]],
               on_kept: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The entry kept under `key` in the cache directory's `file`; when there is none, measure()'s,
    kept there first (with the time it was measured and the machine's load then), after which
    on_kept(entry) runs (a probe logs what it found).

    Raises AnswerNotKept where nothing can be kept; an error of measure() itself goes on as it is.
    Processes asking for any key of one file meanwhile wait for the one that measures.
    """
    path = fused_cells.cache_dir() / file
    known = _read(path)
    if key in known:
        return known[key]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        held = FileLock(path.with_name(f".{file}.lock"), timeout=LOCK_TIMEOUT_S)
        held.acquire()
    except OSError as exc:  # filelock's Timeout is one too
        raise AnswerNotKept(f"{path}: {exc}") from exc
    try:
        known = _read(path)  # measured by the process that held the lock before this one
        if key in known:
            return known[key]
        entry = {**measure(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 # a busy machine's answer may differ from a quiet one's: kept to judge it by
                 "load_average_1m": _load_average()}
        try:
            _write(path, {**known, key: entry})
        except OSError as exc:
            raise AnswerNotKept(f"{path}: {exc}") from exc
    finally:
        held.release()
    if on_kept is not None:
        on_kept(entry)
    return entry


def machine_key(probe: str, version: int) -> list[str]:
    """What any probe's answer on this machine depends on: the CPU model, torch's version, the
    probe's own version and float32's C layer loop; a probe adds its conditions."""
    return [cpu_model(), f"torch {torch.__version__}", f"{probe} {version}", f"C layer loop {c_layer_loop()}"]


@functools.cache  # asked for every fit's key: /proc/cpuinfo is read once per process
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def c_layer_loop() -> str:
    """float32's C layer loop as it is built here (its name carries a hash of its source and
    flags), or 'off' (no compiler, or switched off): a change to it may change what a probe
    would answer."""
    library = fused_cells.library()
    on = library is not None and fused_cells.sequence_kernels_for(torch.float32) is not None
    return Path(library._name).stem if on else "off"


def training_step(config: NetConfig, *, batch_size: int, input_window: int,
                  seed: int = 0) -> Callable[[], None]:
    """One training step of a fresh network of `config` on a random batch: train.training_step,
    what train_network takes per batch, with the default `training` loss (L1) and a fused Adam.

    The network draws its initial weights from torch's generator: call it under
    torch.random.fork_rng, since a night has just seeded that generator for a network of its own.
    """
    from forecasting.train import training_step as take_step  # train imports this module

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, input_window, config.input_size, generator=generator)
    y = torch.randn(batch_size, config.horizon, generator=generator)
    net = RecurrentNet(config)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    loss_fn = nn.L1Loss()
    return functools.partial(take_step, net, optimizer, loss_fn, x, y, grad_clip=1.0)


def alternating_medians(settings: Mapping[Any, Callable[[], ContextManager[Any]]],
                        steps: list[Callable[[], None]], *, rounds: int, repeats: int) -> dict[Any, float]:
    """Seconds per pass over `steps` under each of `settings`, the median of `rounds` rounds that
    take the settings in turn, so that a busy moment of the machine falls on each alike. One
    warm-up pass per setting first: first calls build buffers, kernels and thread pools."""
    times: dict[Any, list[float]] = {name: [] for name in settings}
    for setting in settings.values():
        with setting():
            for step in steps:
                step()
    for _ in range(rounds):
        for name, setting in settings.items():
            with setting():
                start = time.perf_counter()
                for _ in range(repeats):
                    for step in steps:
                        step()
                times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then given back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform, or unobtainable
        return None


def _read(path: Path) -> dict[str, Any]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return known if isinstance(known, dict) else {}


def _write(path: Path, known: dict[str, Any]) -> None:
    """Replace the file whole (a process reading it meanwhile sees the old or the new one)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as tmp:
        try:
            json.dump(known, tmp, indent=1)
        except BaseException:
            os.unlink(tmp.name)
            raise
    try:
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise
