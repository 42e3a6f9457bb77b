"""Small synthetic panels and tiny training budgets shared by the forecaster tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from forecasting.config import TrainingConfig
from forecasting import thread_probe
from forecasting.train import configure_torch_threads

SEASON = 12
HORIZON = 6


def make_panel(n_series: int = 4, length: int = 120, *, freq: str = "MS", season: int = SEASON,
               noise: float = 0.05, seed: int = 0, start: str = "2010-01-01") -> pd.DataFrame:
    """Positive sine + trend series with different phases, levels and slopes."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_series):
        t = np.arange(length)
        level = 10.0 + 5.0 * i
        value = (level + 0.05 * (i + 1) * t + 3.0 * np.sin(2 * np.pi * t / season + i)
                 + noise * level * rng.standard_normal(length) / 10)
        frames.append(pd.DataFrame({
            "series_id": f"s{i}",
            "ts": pd.date_range(start, periods=length, freq=freq),
            "value": value.astype(np.float64),
        }))
    return pd.concat(frames, ignore_index=True)


def tiny_training(**overrides) -> TrainingConfig:
    base = dict(hidden_size=16, max_epochs=30, batch_size=32, learning_rate=1e-2, patience=8,
                max_batches_per_epoch=None, ensemble=1, device="cpu", seed=7)
    return TrainingConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks train fastest (and undisturbed by busy neighbours) on one thread."""
    previous, pinned = torch.get_num_threads(), thread_probe._pinned
    configure_torch_threads(1)
    yield
    configure_torch_threads(previous, pin=pinned)  # as it was: later tests' fits may be probed
