"""Whether bf16-mixed trains faster than float32 on this CPU: measured once, then remembered.

`training.precision: auto` took bf16-mixed on every CPU that multiplies bfloat16 in hardware.
Where that pays is the CPU's to say, not its flags': on an AMD EPYC with avx512_bf16 our
training ran 1.4x faster in bf16-mixed (benchmarks/training_speed.py, 2026-12-07 17:46), on an
Intel Xeon with avx512_bf16 and AMX no faster (LSTM 0.99x, GRU 0.89x, 2026-12-07 22:37): there
float32's layer loops run in C around MKL's products, while bf16-mixed's stay in Python around
torch's. So auto asks the CPU: a few training steps of a sales-sized LSTM and GRU in each
precision, alternating, and takes bf16-mixed only if it is clearly faster.

The answer is written to the cache directory (fused_cells.cache_dir()), keyed by the CPU model,
torch's version, this file's probe version and float32's C layer loop (its build, or none). One
process on a machine measures, on one thread (about two seconds, once), while any other that
asks meanwhile waits for its answer; every later night, and each Dask worker on the machine,
reads it, so they all train in the same precision. Where the answer cannot be kept (a read-only
cache directory), auto takes float32 without measuring, for the same reason. Each machine
measures for itself: Dask workers on machines of another CPU may train in another precision.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from forecasting import fused_cells
from forecasting.models import NetConfig, RecurrentNet
from forecasting.sequence_kernel import matmul_precision

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when the probe or the kernels it times change what it would answer
BF16_MARGIN = 0.90  # bf16-mixed must take at most this share of float32's time: float32 is the
#   exact one, and a near tie is noise
CACHE_FILE = "precision-probe.json"
LOCK_TIMEOUT_S = 120  # a measurement takes seconds; a lock held longer is a stuck process's
_CELLS, _BATCH, _WINDOW, _HORIZON, _HIDDEN, _FEATURES = ("lstm", "gru"), 512, 36, 12, 64, 3  # the sales config's
_ROUNDS, _STEPS = 3, 2  # per round and precision, after one warm-up step each


@functools.cache  # once per process; the file makes it once per machine
def bf16_trains_faster() -> bool:
    """Whether bf16-mixed training steps take clearly less time than float32's on this CPU."""
    key = _machine_key()
    path = fused_cells.cache_dir() / CACHE_FILE
    known = _read(path)
    if key in known:
        return bool(known[key]["bf16_mixed_faster"])
    # One process measures; the others (xdist workers, Dask workers starting together) wait for its
    # answer rather than measure beside it: on the same CPU, at the same moment, they might differ
    with contextlib.ExitStack() as held:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(FileLock(path.with_name(f".{CACHE_FILE}.lock"), timeout=LOCK_TIMEOUT_S))
        except OSError as exc:  # a read-only cache directory; filelock's Timeout is one too
            return _float32_unmeasured(path, exc)
        known = _read(path)
        if key in known:
            return bool(known[key]["bf16_mixed_faster"])
        float32_s, bf16_s = measure()
        faster = bf16_s <= BF16_MARGIN * float32_s
        try:
            _write(path, {**known, key: {"bf16_mixed_faster": faster, "float32_s": float32_s,
                                         "bf16_mixed_s": bf16_s,
                                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
        except OSError as exc:
            return _float32_unmeasured(path, exc)
        log.info("`training.precision` auto: a training step takes %.1f ms in float32, %.1f ms in bf16-mixed on "
                 "this CPU: %s (measured once, kept in %s)", 1e3 * float32_s, 1e3 * bf16_s,
                 "bf16-mixed" if faster else "float32", path)
    return faster


def _float32_unmeasured(path: Path, exc: OSError) -> bool:
    """An answer that cannot be shared would be each process's own, and two processes of one night
    could train in different precisions: float32 then, the exact one, everywhere."""
    log.warning("`training.precision` auto: float32, unmeasured: the precision probe's answer cannot be "
                "kept in %s for other processes (%s)", path, exc)
    return False


def measure() -> tuple[float, float]:
    """Seconds per training step (forward, backward, Adam) of an LSTM and a GRU together, float32
    and bf16-mixed: the median of rounds that alternate the two, so that a busy moment of the
    machine falls on both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same conditions in every process, whatever threads it trains with
    try:
        # The probe's networks draw their weights from torch's generator: a night seeded it for
        # the network it is about to train, whose draws must not depend on whether this ran
        with torch.random.fork_rng(devices=[]):
            return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_BATCH, _WINDOW, _FEATURES, generator=generator)
    y = torch.randn(_BATCH, _HORIZON, generator=generator)
    steps = [_training_step(cell, x, y) for cell in _CELLS]
    rounds: dict[str, list[float]] = {"float32": [], "bf16-mixed": []}
    for precision in rounds:  # warm-up: first calls build buffers and kernels
        with matmul_precision(precision):
            for step in steps:
                step()
    for _ in range(_ROUNDS):
        for precision, times in rounds.items():
            with matmul_precision(precision):
                start = time.perf_counter()
                for _ in range(_STEPS):
                    for step in steps:
                        step()
                times.append((time.perf_counter() - start) / _STEPS)
    return statistics.median(rounds["float32"]), statistics.median(rounds["bf16-mixed"])


def _training_step(cell: str, x: torch.Tensor, y: torch.Tensor):
    net = RecurrentNet(NetConfig(cell=cell, input_size=_FEATURES, hidden_size=_HIDDEN, horizon=_HORIZON,
                                 season_length=12))
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    loss_fn = nn.L1Loss()

    def step() -> None:
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _machine_key() -> str:
    # float32's C layer loop (none without a compiler, or switched off) changes the answer, and so
    # may a change to it: its build's name carries a hash of its source and flags
    library = fused_cells.library()
    c_loop = library is not None and fused_cells.sequence_kernels_for(torch.float32) is not None
    return "|".join([_cpu_model(), f"torch {torch.__version__}", f"probe {PROBE_VERSION}",
                     f"C layer loop {Path(library._name).stem if c_loop else 'off'}"])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return known if isinstance(known, dict) else {}


def _write(path: Path, known: dict) -> None:
    """Replace the file whole (a process reading it meanwhile sees the old or the new one)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{CACHE_FILE}.", delete=False,
                                     encoding="utf-8") as tmp:
        json.dump(known, tmp, indent=1)
    os.replace(tmp.name, path)
