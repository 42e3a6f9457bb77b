"""How many of torch's threads a network trains fastest on: measured once per machine and shape.

A night gave each network every core of the machine (configure_torch_threads). At the sizes
these forecasters train at, more threads are often slower: a training step is a few hundred
small matrix products and elementwise passes, and waking a second thread for each costs more
than it saves. On a 2-core AMD EPYC with avx512_bf16 (benchmarks/thread_counts.py, 2026-12-08
01:52) a sales-sized step (batch 512, window 36, hidden 64) took 2.00x as long on 2 threads as
on 1 for the RNN, 1.45x for the GRU, 1.09x for the LSTM; at hidden 256, 0.60x to 0.74x; at batch
2048 the LSTM's 0.78x, the RNN's 0.97x. On an Intel Xeon with AMX a night's LSTM fit took 17.7 s
on 2 sleeping threads (OMP_WAIT_POLICY=PASSIVE, what the package sets) against 11.5 s on 1, and
9.7 s on 2 spinning ones (2026-12-08 00:35). Which count wins is the CPU's, the shape's and
OpenMP's wait policy's to say.

So before a network trains on the CPU, `training_threads` times its training steps (a fresh
network of its config, at its batch size and input window, in its precision) on 1, 2, 4, ...
threads up to what the process has, taking turns; it takes more threads only where they take at
most 90% of fewer threads' time: a thread that gains less leaves its core to the rest of the
machine (the MLflow process, another night). The answer is kept per machine (machine_probes: the
CPU model, torch's version, the C layer loop), OpenMP wait policy and shape; every later fit of
that shape, in any process on the machine, reads it. The nightly flow asks for its candidates'
shapes at its start, before its MLflow process starts beside it, so that a first night measures
on a machine as quiet as it will be (a current champion re-scored under other settings than
tonight's is measured when it trains, if its shape is new). OpenMP reads its wait settings when
torch loads: `import forecasting` before torch, as the package's own entry points do, or the key
may name a policy the threads do not follow.

Not measured, the process's threads as they are: training on CUDA (its threads only feed the
GPU), a process that has one thread (a Dask worker), a count pinned with OMP_NUM_THREADS or by
configure_torch_threads, and where no answer can be kept (a read-only cache directory) or the
probe failed (one warning per shape and process: a speed-up must not fail a night).

The thread count changes the order of some floating-point sums, so the same seed trains a network
that differs in its last bits on another count (and early stopping may then stop an epoch apart):
pin OMP_NUM_THREADS where nights must reproduce bit for bit across machines or cache resets.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch

from forecasting import fused_cells, machine_probes
from forecasting.models import NetConfig
from forecasting.sequence_kernel import matmul_precision

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when the probe or the kernels it times change what it would answer
MARGIN = 0.90  # more threads must take at most this share of fewer threads' time
CACHE_FILE = "thread-probe.json"
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")  # they change the answer
_ROUNDS, _REPEATS = 3, 2  # per round and thread count, after one warm-up step each
_answers: dict[str, int] = {}  # this process's, by key: the file is read once per shape
_pinned = False  # set by train.configure_torch_threads


def pin_threads(pinned: bool) -> None:
    """Whether every network trains on all the process's torch threads (configure_torch_threads)."""
    global _pinned
    _pinned = pinned


def omp_num_threads() -> int | None:
    """$OMP_NUM_THREADS as a thread count; None where it is unset or not one count (0, '4,2')."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def training_threads(config: NetConfig, *, batch_size: int, input_window: int, precision: str) -> int:
    """The torch threads a network of `config` trains fastest on, at most the process's."""
    available = torch.get_num_threads()
    if available <= 1 or _pinned or omp_num_threads() is not None:
        return available  # one thread, or a pinned count: nothing to choose
    counts = thread_counts(available)
    key = _key(config, batch_size=batch_size, input_window=input_window, precision=precision, counts=counts)
    if key in _answers:
        return _answers[key]
    try:
        answer = machine_probes.remembered(
            CACHE_FILE, key, functools.partial(_measured_answer, config, batch_size, input_window, precision, counts),
            on_kept=functools.partial(_log_answer, config, batch_size, input_window, precision))
        threads = int(answer["threads"])
        if threads not in counts:
            raise ValueError(f"kept answer 'threads' ({threads!r}) is not one of {counts}")
    except Exception as exc:  # remembered too: every fit of the shape in this process trains alike,
        # and none waits again for a lock that timed out
        log.warning("training threads for %s: %d, unmeasured: %s", config.cell, available, exc)
        threads = available
    _answers[key] = threads
    return threads


def thread_counts(available: int) -> list[int]:
    """1, 2, 4, ... below `available`, then `available`: the counts a probe compares."""
    counts = [1]
    while counts[-1] * 2 < available:
        counts.append(counts[-1] * 2)
    return counts + [available] if available > 1 else counts


def fewest_clearly_fastest(seconds: dict[int, float]) -> int:
    """From one thread up, each larger count taken only where its step takes at most MARGIN of
    the count taken so far."""
    chosen = min(seconds)
    for n in sorted(seconds)[1:]:
        if seconds[n] <= MARGIN * seconds[chosen]:
            chosen = n
    return chosen


def measure(config: NetConfig, *, batch_size: int, input_window: int, precision: str,
            counts: list[int]) -> dict[int, float]:
    """Seconds per training step of a fresh network of `config` on each of `counts` threads."""
    # Its network draws its weights from torch's generator, which a night has just seeded for the
    # network it trains next: that network's draws must not depend on whether this ran
    with torch.random.fork_rng(devices=[]), matmul_precision(precision):
        step = machine_probes.training_step(config, batch_size=batch_size, input_window=input_window)
        return machine_probes.alternating_medians(
            {n: functools.partial(machine_probes.torch_threads, n) for n in counts}, [step],
            rounds=_ROUNDS, repeats=_REPEATS)


def _measured_answer(config: NetConfig, batch_size: int, input_window: int, precision: str,
                     counts: list[int]) -> dict:
    seconds = measure(config, batch_size=batch_size, input_window=input_window, precision=precision, counts=counts)
    return {"threads": fewest_clearly_fastest(seconds), "seconds": {str(n): s for n, s in seconds.items()}}


def _log_answer(config: NetConfig, batch_size: int, input_window: int, precision: str, answer: dict) -> None:
    log.info("training threads for %s (hidden %d, batch %d, window %d, %s): %d; a step took %s (measured once, "
             "kept in %s)", config.cell, config.hidden_size, batch_size, input_window, precision, answer["threads"],
             ", ".join(f"{1e3 * s:.1f} ms on {n}" for n, s in answer["seconds"].items()),
             fused_cells.cache_dir() / CACHE_FILE)


def _key(config: NetConfig, *, batch_size: int, input_window: int, precision: str, counts: list[int]) -> str:
    shape = ",".join(f"{name}={value}" for name, value in sorted(dataclasses.asdict(config).items()))
    waits = ",".join(f"{name}={os.environ.get(name, '')}" for name in WAIT_SETTINGS)
    return "|".join([*machine_probes.machine_key("probe", PROBE_VERSION), f"threads {counts}", waits,
                     f"batch {batch_size}", f"window {input_window}", precision, shape])
