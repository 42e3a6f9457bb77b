"""A pool of large CPU tensors, reused across training steps instead of allocated fresh.

The CPU training kernel (forecasting.sequence_kernel) needs ~10-60 MB of buffers per layer and
step (every step's activations, gradients and products' inputs). Fresh allocations that size
come from mmap, and their first writes fault every page in: measured 1,700 minor page faults per
GRU training step once pyarrow had been imported (which MLflow and pandas' parquet do) - glibc
then stops raising its mmap threshold - and bf16-mixed training 25% slower for it (45k against
34k windows/s). Buffers taken here and given back after the backward pass are written again
without faulting. The pool is bounded: free buffers beyond `max_bytes` are dropped, least
recently used shape first. Thread-safe (Prefect runs tasks in threads).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

Key = tuple[tuple[int, ...], torch.dtype, torch.device]


class BufferPool:
    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"`max_bytes` ({max_bytes!r}) must be >= 0")
        self.max_bytes = max_bytes
        self._free: OrderedDict[Key, list[torch.Tensor]] = OrderedDict()  # oldest shape first
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of this shape, dtype and device, uninitialised (like torch.empty)."""
        key = (shape, dtype, device)
        with self._lock:
            free = self._free.get(key)
            if free:
                tensor = free.pop()
                if free:
                    self._free.move_to_end(key)
                else:  # no empty list stays behind: `give` evicts from the oldest list
                    del self._free[key]
                self._bytes -= tensor.nbytes
                return tensor
        return torch.empty(shape, dtype=dtype, device=device)

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Hand tensors back (None is skipped): the caller must hold no view of them."""
        with self._lock:
            for tensor in tensors:
                if tensor is None:
                    continue
                key = (tuple(tensor.shape), tensor.dtype, tensor.device)
                self._free.setdefault(key, []).append(tensor)
                self._free.move_to_end(key)
                self._bytes += tensor.nbytes
            while self._bytes > self.max_bytes and self._free:
                key, free = next(iter(self._free.items()))
                self._bytes -= free.pop(0).nbytes
                if not free:
                    del self._free[key]

    @property
    def free_bytes(self) -> int:
        return self._bytes
