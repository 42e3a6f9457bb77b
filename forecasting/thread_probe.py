"""How many of torch's threads a network trains fastest on: measured once per machine and shape.

A night gave each network every core of the machine (configure_torch_threads). At the sizes
these forecasters train at, more threads are often slower: a training step is a few hundred
small matrix products and elementwise passes, and waking a second thread for each costs more
than it saves. On a 2-core AMD EPYC with avx512_bf16 (benchmarks/thread_counts.py, 2026-12-08
01:52) a sales-sized step (batch 512, window 36, hidden 64) took 2.00x as long on 2 threads as
on 1 for the RNN, 1.45x for the GRU, 1.09x for the LSTM; at hidden 256, 0.60x to 0.74x; at batch
2048 the LSTM's 0.78x, the RNN's 0.97x. On an Intel Xeon with AMX a night's LSTM fit took 17.7 s
on 2 threads against 11.5 s on 1 (2026-12-08 00:35). Which count wins is the CPU's and the
shape's to say.

So before a network trains on the CPU, `training_threads` times its training steps (a fresh
network of its config, at its batch size and input window, in its precision) on 1, 2, 4, ...
threads up to what the process has, taking turns, and the network trains on the fewest threads
within 10% of the fastest: a thread that gains less leaves its core to the rest of the machine
(the MLflow process, another night). The answer is kept per machine (machine_probes: the CPU
model, torch's version, the C layer loop) and shape; every later fit of that shape, in any
process on the machine, reads it.

Not measured, the process's threads as they are: training on CUDA (its threads only feed the
GPU), a process that has one thread (a Dask worker, OMP_NUM_THREADS=1), a thread count the user
pinned with OMP_NUM_THREADS, and where no answer can be kept (a read-only cache directory).
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
_ROUNDS, _REPEATS = 3, 2  # per round and thread count, after one warm-up step each
_answers: dict[str, int] = {}  # this process's, by key: the file is read once per shape


def training_threads(config: NetConfig, *, batch_size: int, input_window: int, precision: str) -> int:
    """The torch threads a network of `config` trains fastest on, at most the process's."""
    available = torch.get_num_threads()
    if available <= 1 or os.environ.get("OMP_NUM_THREADS", "").strip():
        return available  # one thread, or the user's pinned count: nothing to choose
    counts = thread_counts(available)
    key = _key(config, batch_size=batch_size, input_window=input_window, precision=precision, counts=counts)
    if key not in _answers:
        try:
            answer = machine_probes.remembered(
                CACHE_FILE, key, functools.partial(_measured_answer, config, batch_size, input_window, precision,
                                                   counts))
            _answers[key] = int(answer["threads"])
        except OSError as exc:  # as before the probe, in every process of the night alike
            log.warning("training threads: %d, unmeasured: the thread probe's answer cannot be kept in %s (%s)",
                        available, fused_cells.cache_dir() / CACHE_FILE, exc)
            _answers[key] = available
    return min(_answers[key], available)


def thread_counts(available: int) -> list[int]:
    """1, 2, 4, ... below `available`, then `available`: the counts a probe compares."""
    counts = [1]
    while counts[-1] * 2 < available:
        counts.append(counts[-1] * 2)
    return counts + [available] if available > 1 else counts


def fewest_within_margin(seconds: dict[int, float]) -> int:
    """The fewest threads whose step takes at most the fastest's time / MARGIN."""
    fastest = min(seconds.values())
    return min(n for n, s in seconds.items() if MARGIN * s <= fastest)


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
    threads = fewest_within_margin(seconds)
    log.info("training threads for %s (hidden %d, batch %d, window %d, %s): %d; a step took %s (measured once, "
             "kept in %s)", config.cell, config.hidden_size, batch_size, input_window, precision, threads,
             ", ".join(f"{1e3 * s:.1f} ms on {n}" for n, s in seconds.items()),
             fused_cells.cache_dir() / CACHE_FILE)
    return {"threads": threads, "seconds": {str(n): s for n, s in seconds.items()}}


def _key(config: NetConfig, *, batch_size: int, input_window: int, precision: str, counts: list[int]) -> str:
    shape = ",".join(f"{name}={value}" for name, value in sorted(dataclasses.asdict(config).items()))
    return "|".join([machine_probes.cpu_model(), f"torch {torch.__version__}", f"probe {PROBE_VERSION}",
                     f"C layer loop {machine_probes.c_layer_loop()}", f"threads {counts}",
                     f"batch {batch_size}", f"window {input_window}", precision, shape])
