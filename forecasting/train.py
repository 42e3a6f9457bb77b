"""Training loop for one network: mini-batches of windows, Adam, clipping, early stopping.

The windows are start indices into one float32 tensor (forecasting.windows); a batch is gathered
on the device, split into the input part and the target part, and the loss is taken in scaled
space. The best weights by validation loss are restored at the end. Nothing leaves the device
per batch: the epoch's loss is summed there and read once (a `.item()` per batch is a CUDA sync).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import platform
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from forecasting.config import TrainingConfig
from forecasting.machine_probes import torch_threads
from forecasting.models import RecurrentNet
from forecasting.precision_probe import bf16_trains_faster
from forecasting.sequence_kernel import matmul_precision
from forecasting.stopping import raise_if_released
from forecasting.thread_probe import omp_num_threads, pin_threads, training_threads

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, float, float], None]


def configure_torch_threads(n: int | None = None, *, pin: bool | None = None) -> int:
    """Set torch's intra-op threads once for the process (None: $OMP_NUM_THREADS if set, else one
    per CPU core this process may run on: taskset's and a container's CPU set count, not the
    host's): the most that a network trains on.

    Each network trains on the CPU on the fewest of them that a probe of its shape found fastest
    (forecasting.thread_probe), unless the count is pinned - by pin=True, an `n` given here, or
    $OMP_NUM_THREADS (which pins whatever is called) - and every network then trains on all of
    them. The flows call this at their start: in a flow, OMP_NUM_THREADS is what pins.
    """
    if n is not None and n < 1:
        raise ValueError(f"`n` ({n!r}) must be >= 1 or None")
    from_env = omp_num_threads()
    pinned = pin if pin is not None else (n is not None or from_env is not None)
    if n is None:
        n = from_env or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(n)
    pin_threads(pinned)
    return n


def effective_precision(precision: str, device: torch.device, strategy: str = "direct") -> str:
    """`training.precision` as it applies on `device`: float32 or bf16-mixed.

    bf16-mixed is the direct strategy's CPU kernel's; the recursive strategy trains through
    torch's own recurrent layers, in float32, whatever was asked for.

    auto takes bf16-mixed only where it pays: CPU training on a CPU that multiplies bfloat16 in
    hardware, where bf16-mixed training steps measured clearly faster than float32's
    (forecasting.precision_probe: measured once per machine). bf16-mixed asked for by name is
    the CPU kernel's: on CUDA the networks train in float32, and on a CPU without native
    bfloat16 it is honoured, with a warning, because it is far slower there (emulated products:
    sales night on an AVX2 EPYC, 2026-11-29, LSTM backtest 131 s against 12.9 s in float32).
    """
    if strategy == "recursive":
        if precision == "bf16-mixed":
            log.warning("`training.precision` ('bf16-mixed') applies to the direct strategy; with "
                        "`strategy` ('recursive') the networks train in float32")
        return "float32"
    if precision == "auto":
        applied = ("bf16-mixed" if device.type == "cpu" and cpu_has_native_bf16() is True and bf16_trains_faster()
                   else "float32")
        _log_auto_choice(applied, device.type)
        return applied
    if precision == "bf16-mixed" and device.type != "cpu":
        log.warning("`training.precision` ('bf16-mixed') applies to CPU training; on %s the networks "
                    "train in float32", device.type)
        return "float32"
    if precision == "bf16-mixed" and cpu_has_native_bf16() is False:
        _warn_emulated_bf16()
    return precision


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU multiplies bfloat16 in hardware; None where torch cannot tell (not x86)."""
    cpu = torch.cpu
    if platform.machine().lower() not in ("x86_64", "amd64") or not hasattr(cpu, "_is_avx512_bf16_supported"):
        return None
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


@functools.cache  # once per process, not once per fit
def _log_auto_choice(applied: str, device_type: str) -> None:
    log.info("`training.precision` auto: %s on %s (%s, native bfloat16 products: %s)", applied, device_type,
             torch.backends.cpu.get_cpu_capability(), cpu_has_native_bf16())


@functools.cache  # once per process, not once per fit
def _warn_emulated_bf16() -> None:
    log.warning("`training.precision` is 'bf16-mixed' but this CPU has no native bfloat16 products "
                "(avx512_bf16 or AMX): they are emulated, and training runs 8-12x slower than in "
                "float32; `precision: auto` uses bf16-mixed only where the CPU has them")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` ('cuda') was asked for but CUDA is not available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"`device` ({device!r}) must be 'auto', 'cpu' or 'cuda'")
    return torch.device(device)


def check_training_device(device: str, *, dataset: str) -> None:
    """`training.device` 'cuda' on a machine without CUDA, refused before any work: it failed
    only as the first network trained, after the baselines' backtests, naming no dataset."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"dataset {dataset!r}: `training.device` is 'cuda', but torch {torch.__version__} sees no "
                         "CUDA device here (where the networks train and the current champion is re-scored, "
                         "--dask or not); use 'auto' or 'cpu'")


def applied_precision(training: TrainingConfig) -> str:
    """What `training.precision` comes to for the configured device on this host (auto: per CPU)."""
    return effective_precision(training.precision, resolve_device(training.device), training.strategy)


def training_step(net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, inputs: torch.Tensor,
                  targets: torch.Tensor, *, grad_clip: float) -> torch.Tensor:
    """One optimiser step on a batch: forward, loss, backward, gradient clipping, update; the loss.
    What the probes time (forecasting.machine_probes), so that they time what training does."""
    loss = loss_fn(net(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return loss


def _loss_fn(name: str) -> nn.Module:
    losses = {"mae": nn.L1Loss(), "mse": nn.MSELoss(), "huber": nn.HuberLoss(delta=1.0)}
    if name not in losses:
        raise ValueError(f"`loss` ({name!r}) must be one of {list(losses)}")
    return losses[name]


@torch.inference_mode()
def evaluate(net: nn.Module, data: torch.Tensor, starts: torch.Tensor, *, input_window: int,
             horizon: int, loss_fn: nn.Module, batch_size: int) -> float:
    net.eval()
    offsets = torch.arange(input_window + horizon, device=data.device)  # [w+h]
    total = torch.zeros((), dtype=torch.float64, device=data.device)  # summed like a Python float
    for i in range(0, len(starts), batch_size):
        batch = data[starts[i:i + batch_size, None] + offsets]  # [b, w+h, f]
        pred = net(batch[:, :input_window])  # [b, horizon]
        total += loss_fn(pred, batch[:, input_window:, 0]) * len(batch)
    return total.item() / max(len(starts), 1)


def train_network(net: nn.Module, data: torch.Tensor, train_starts: np.ndarray,
                  val_starts: np.ndarray, *, input_window: int, horizon: int,
                  training: TrainingConfig, seed: int, device: torch.device,
                  on_epoch: EpochCallback | None = None) -> list[dict]:
    """Train `net` in place on windows of `data`; return the per-epoch history (each epoch's
    losses and, on the CPU, the torch threads it trained on)."""
    precision = effective_precision(training.precision, device, training.strategy)
    if device.type != "cpu" or not isinstance(net, RecurrentNet):  # CPU threads only feed a GPU
        with matmul_precision(precision):
            return _train(net, data, train_starts, val_starts, input_window=input_window, horizon=horizon,
                          training=training, seed=seed, device=device, on_epoch=on_epoch)
    # the fewest threads that train it fastest; keyed by the configured batch, not the windows
    # there are to batch, so that a growing dataset's nights keep one answer
    threads = training_threads(net.config, batch_size=training.batch_size, input_window=input_window,
                               precision=precision)
    with matmul_precision(precision), torch_threads(threads):
        history = _train(net, data, train_starts, val_starts, input_window=input_window, horizon=horizon,
                         training=training, seed=seed, device=device, on_epoch=on_epoch)
    return [{**epoch, "threads": threads} for epoch in history]


def _train(net: nn.Module, data: torch.Tensor, train_starts: np.ndarray, val_starts: np.ndarray, *,
           input_window: int, horizon: int, training: TrainingConfig, seed: int, device: torch.device,
           on_epoch: EpochCallback | None) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    loss_fn = _loss_fn(training.loss)
    net.to(device)
    data = data.to(device)  # [total_steps, features] float32
    train_idx = torch.as_tensor(train_starts, dtype=torch.int64)
    val_idx = torch.as_tensor(val_starts, dtype=torch.int64).to(device)
    # fused: one kernel for every parameter's update on the CPU, not ~10 ops per parameter tensor
    optimizer = torch.optim.Adam(net.parameters(), lr=training.learning_rate, fused=device.type == "cpu")
    steps_cap = training.max_batches_per_epoch
    offsets = torch.arange(input_window + horizon, device=device)  # [w+h]: rows of a window, made once
    best, best_state, bad_epochs, history = float("inf"), None, 0, []
    for epoch in range(1, training.max_epochs + 1):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        if steps_cap is not None:
            order = order[: steps_cap * training.batch_size]
        order = order.to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, len(order), training.batch_size):
            raise_if_released()  # on a Dask worker, a night that ended stops here, not epochs later
            batch = data[order[i:i + training.batch_size, None] + offsets]  # [b, w+h, f]
            loss = training_step(net, optimizer, loss_fn, batch[:, :input_window], batch[:, input_window:, 0],
                                 grad_clip=training.grad_clip)
            total += loss.detach() * len(batch)
        train_loss = total.item() / max(len(order), 1)
        val_loss = (evaluate(net, data, val_idx, input_window=input_window, horizon=horizon,
                             loss_fn=loss_fn, batch_size=4 * training.batch_size)
                    if len(val_idx) else train_loss)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        log.debug("epoch %d train %.4f val %.4f", epoch, train_loss, val_loss)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
        if val_loss < best - 1e-6:
            best, best_state, bad_epochs = val_loss, copy.deepcopy(net.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= training.patience:
                log.info("early stop at epoch %d (best val %.4f)", epoch, best)
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history
