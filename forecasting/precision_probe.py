"""Whether bf16-mixed trains faster than float32 on this CPU: measured once, then remembered.

`training.precision: auto` took bf16-mixed on every CPU that multiplies bfloat16 in hardware.
Where that pays is the CPU's to say, not its flags': on an AMD EPYC with avx512_bf16 our
training ran 1.4x faster in bf16-mixed (benchmarks/training_speed.py, 2026-12-07 17:46), on an
Intel Xeon with avx512_bf16 and AMX no faster (LSTM 0.99x, GRU 0.89x, 2026-12-07 22:37): there
float32's layer loops run in C around MKL's products, while bf16-mixed's stay in Python around
torch's. So auto asks the CPU: a few training steps of a sales-sized LSTM and GRU in each
precision, alternating, and takes bf16-mixed only if it is clearly faster.

The answer is kept in the cache directory (forecasting.machine_probes), keyed by the CPU model,
torch's version, this file's probe version and float32's C layer loop (its build, or none). One
process on a machine measures, on one thread (about two seconds, once), while any other that
asks meanwhile waits for its answer; every later night, and each Dask worker on the machine,
reads it, so they all train in the same precision. Where the answer cannot be kept (a read-only
cache directory), auto takes float32 without measuring, for the same reason. Each machine
measures for itself: Dask workers on machines of another CPU may train in another precision.
"""

from __future__ import annotations

import functools
import logging

import torch

from forecasting import fused_cells, machine_probes
from forecasting.models import NetConfig
from forecasting.sequence_kernel import matmul_precision

log = logging.getLogger(__name__)

PROBE_VERSION = 2  # bump when the probe or the kernels it times change what it would answer
BF16_MARGIN = 0.90  # bf16-mixed must take at most this share of float32's time: float32 is the
#   exact one, and a near tie is noise
CACHE_FILE = "precision-probe.json"
_CELLS, _BATCH, _WINDOW, _HORIZON, _HIDDEN, _FEATURES = ("lstm", "gru"), 512, 36, 12, 64, 3  # the sales config's
_ROUNDS, _STEPS = 3, 2  # per round and precision, after one warm-up step each


@functools.cache  # once per process; the file makes it once per machine
def bf16_trains_faster() -> bool:
    """Whether bf16-mixed training steps take clearly less time than float32's on this CPU."""
    try:
        answer = machine_probes.remembered(CACHE_FILE, _machine_key(), _measured_answer, on_kept=_log_answer)
    except machine_probes.AnswerNotKept as exc:
        return _float32_unmeasured(exc)
    return bool(answer["bf16_mixed_faster"])


def _measured_answer() -> dict:
    float32_s, bf16_s = measure()
    return {"bf16_mixed_faster": bf16_s <= BF16_MARGIN * float32_s, "float32_s": float32_s, "bf16_mixed_s": bf16_s}


def _log_answer(answer: dict) -> None:
    log.info("`training.precision` auto: a training step takes %.1f ms in float32, %.1f ms in bf16-mixed on "
             "this CPU: %s (measured once, kept in %s)", 1e3 * answer["float32_s"], 1e3 * answer["bf16_mixed_s"],
             "bf16-mixed" if answer["bf16_mixed_faster"] else "float32", fused_cells.cache_dir() / CACHE_FILE)


def _float32_unmeasured(exc: Exception) -> bool:
    """An answer that cannot be shared would be each process's own, and two processes of one night
    could train in different precisions: float32 then, the exact one, everywhere."""
    log.warning("`training.precision` auto: float32, unmeasured: the precision probe's answer cannot be "
                "kept for other processes (%s)", exc)
    return False


def measure() -> tuple[float, float]:
    """Seconds per training step (forward, backward, clipping, Adam) of an LSTM and a GRU together, float32
    and bf16-mixed: the median of rounds that alternate the two, so that a busy moment of the
    machine falls on both."""
    # One thread: the same conditions in every process, whatever threads it trains with. The
    # probe's networks draw their weights from torch's generator: a night seeded it for the
    # network it is about to train, whose draws must not depend on whether this ran.
    with machine_probes.torch_threads(1), torch.random.fork_rng(devices=[]):
        steps = [machine_probes.training_step(
            NetConfig(cell=cell, input_size=_FEATURES, hidden_size=_HIDDEN, horizon=_HORIZON, season_length=12),
            batch_size=_BATCH, input_window=_WINDOW) for cell in _CELLS]
        seconds = machine_probes.alternating_medians(
            {precision: functools.partial(matmul_precision, precision) for precision in ("float32", "bf16-mixed")},
            steps, rounds=_ROUNDS, repeats=_STEPS)
    return seconds["float32"], seconds["bf16-mixed"]


def _machine_key() -> str:
    return "|".join(machine_probes.machine_key("probe", PROBE_VERSION))
