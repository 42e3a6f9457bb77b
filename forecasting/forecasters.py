"""Forecasters: one fit/predict/save interface over the baselines and the recurrent networks.

    make_forecaster("gru", freq="MS", horizon=12, season_length=12, training=TrainingConfig())
        .fit(train_panel)          # global training over all series
        .predict(history_panel)    # the `horizon` steps after each series' last ts

Panels are long frames: series_id, ts, value (+ covariate columns), sorted by (series_id, ts).
Saved forecasters are a `forecaster.json` (config, scaler) plus, for networks, a `weights.pt`
state_dict; loading never unpickles arbitrary objects (torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from forecasting import baselines
from forecasting.config import BASELINES, CELLS, TrainingConfig
from forecasting.models import EnsembleNet, NetConfig
from forecasting.train import applied_precision, resolve_device, train_network
from forecasting.windows import (
    Scaler,
    SeriesFeatures,
    build_features,
    calendar_channels,
    check_horizon,
    check_panel,
    last_windows,
    series_blocks,
    tail_rows,
    window_starts,
    years_per_step,
)

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, float, float], None]
CONFIG_FILE = "forecaster.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1
# Each member's initial weights and its dropout masks come from torch's global generator, seeded
# per member. Two networks training in threads of one process (a Dask worker with several
# threads) would interleave their draws, and the same seed would give other models: one network
# trains at a time in a process, and building one (whose init draws) waits for it. They would
# share its cores anyway (one torch thread pool).
_GLOBAL_RNG_HELD = threading.Lock()
PREDICT_BATCH = 4096  # series per forward pass at predict: bounds the activations' memory


class Forecaster:
    """Base class: what every model offers the pipeline."""

    kind = "base"

    def __init__(self, name: str, *, freq: str, horizon: int, season_length: int,
                 training: TrainingConfig, covariates: Sequence[str] = ()) -> None:
        self.name = name
        self.freq = freq
        self.horizon = check_horizon(horizon)
        if season_length < 1:
            raise ValueError(f"`season_length` ({season_length!r}) must be >= 1")
        self.season_length = int(season_length)
        self.training = training
        self.covariates = tuple(covariates)
        self.history: list[dict] = []
        self.torch_module: nn.Module | None = None

    # -- interface
    def fit(self, panel: pd.DataFrame, *, on_epoch: EpochCallback | None = None) -> Forecaster:
        raise NotImplementedError

    def predict(self, panel: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    def example_input(self, panel: pd.DataFrame) -> pd.DataFrame:
        """What a registered version's pyfunc takes (its input example): the last rows of the
        panel's first two series that a forecast of them reads."""
        first = panel["series_id"].drop_duplicates().head(2)
        rows = panel[panel["series_id"].isin(first)].groupby("series_id", sort=False).tail(self._history_needed())
        return rows[["series_id", "ts", "value", *self.covariates_read]].reset_index(drop=True)

    @property
    def covariates_read(self) -> tuple[str, ...]:
        """The covariates a forecast reads: a baseline's none (it keeps the dataset's for its record)."""
        return ()

    def _history_needed(self) -> int:
        return self.season_length  # a season: all seasonal naive reads; ETS fits a shorter model to it

    @property
    def params(self) -> dict[str, Any]:
        return {"model": self.name, "kind": self.kind, "freq": self.freq, "horizon": self.horizon,
                "season_length": self.season_length}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self._state(), indent=1))

    # -- helpers
    def _state(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "kind": self.kind, "name": self.name, "freq": self.freq,
                "horizon": self.horizon, "season_length": self.season_length,
                "training": self.training.model_dump(mode="json"), "covariates": list(self.covariates)}

    def _frame(self, series_ids: Sequence[str], last_ts: Sequence[pd.Timestamp],
               values: np.ndarray) -> pd.DataFrame:
        """Tidy forecasts: series_id, step, ts, value from a [series, horizon] array."""
        h = self.horizon
        last = pd.DatetimeIndex(last_ts).as_unit("ns").asi8 if len(last_ts) else np.empty(0, np.int64)
        ends, inverse = np.unique(last, return_inverse=True)  # series mostly share their last ts
        future = np.array([pd.date_range(pd.Timestamp(end), periods=h + 1, freq=self.freq)[1:].as_unit("ns").asi8
                           for end in ends], np.int64).reshape(len(ends), h)  # [distinct ends, horizon]
        return pd.DataFrame({
            "series_id": np.repeat(np.asarray(series_ids, dtype=object), h),
            "step": np.tile(np.arange(1, h + 1), len(series_ids)),
            "ts": future[inverse.reshape(-1)].reshape(-1).astype("datetime64[ns]"),
            "value": np.asarray(values, np.float64).reshape(-1),
        })


class BaselineForecaster(Forecaster):
    """naive, seasonal_naive or ets: no trained state; each forecast conditions on its history."""

    kind = "baseline"

    def fit(self, panel: pd.DataFrame, *, on_epoch: EpochCallback | None = None) -> BaselineForecaster:
        # Nothing to fit across series: ETS estimates its parameters per series when it
        # forecasts (so a night's ETS fitting shows in its forecast stage, and on a Dask cluster
        # it is split into the forecast's shards).
        check_panel(panel, min_length=1, min_length_name="1")
        return self

    def predict(self, panel: pd.DataFrame) -> pd.DataFrame:
        """Every series at once: naive and seasonal naive as array lookups, ETS one fit per series
        (in worker processes when there are many; see baselines.ets_many)."""
        check_panel(panel, min_length=1, min_length_name="1")
        blocks = series_blocks(panel)
        values = panel["value"].to_numpy(np.float64)
        values = values if blocks.order is None else values[blocks.order]  # series after series
        ends = blocks.starts + blocks.lengths  # [series] one past each series' last value
        if self.name == "naive":
            rows = baselines.naive_many(values, ends, self.horizon)
        elif self.name == "seasonal_naive":
            rows = baselines.seasonal_naive_many(values, blocks.starts, ends, self.horizon, self.season_length)
        else:
            histories = [values[a:b] for a, b in zip(blocks.starts, ends)]
            rows = baselines.ets_many(histories, self.horizon, self.season_length, series_ids=blocks.ids)
        ts = panel["ts"].to_numpy("datetime64[ns]")
        last = ends - 1 if blocks.order is None else blocks.order[ends - 1]
        return self._frame(blocks.ids, list(pd.DatetimeIndex(ts[last])), rows)


class NeuralForecaster(Forecaster):
    """rnn, lstm or gru, trained globally over all series (see forecasting.models)."""

    kind = "neural"

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        t = self.training
        self.input_window = t.resolved(horizon=self.horizon, season_length=self.season_length).input_window
        self.net_config = NetConfig(
            cell=name, input_size=1 + calendar_channels(t.annual_cycle) + len(self.covariates),
            hidden_size=t.hidden_size, num_layers=t.num_layers, dropout=t.dropout, horizon=self.horizon,
            strategy=t.strategy, season_length=self.season_length, residual=t.residual,
            local_level=t.local_level, annual_cycle=t.annual_cycle,
            years_per_step=years_per_step(self.freq) if t.annual_cycle else 0.0,
        )
        self.scaler: Scaler | None = None

    def fit(self, panel: pd.DataFrame, *, on_epoch: EpochCallback | None = None) -> NeuralForecaster:
        t = self.training
        check_panel(panel, covariates=self.covariates, min_length=self.input_window + self.horizon)
        device = resolve_device(t.device)
        self.scaler = Scaler.fit(panel, scaling=t.scaling, scale_by=t.scale_by,
                                 season_length=self.season_length, covariates=self.covariates)
        features = build_features(panel, self.scaler, freq=self.freq, season_length=self.season_length,
                                  covariates=self.covariates, annual_cycle=t.annual_cycle)
        val_steps = t.resolved(horizon=self.horizon, season_length=self.season_length).val_steps
        train_starts, val_starts = window_starts(features, input_window=self.input_window,
                                                 horizon=self.horizon, val_steps=val_steps)
        if len(train_starts) == 0:  # every series has a single window: train on it, and stop
            train_starts = val_starts  # on its own loss (nothing is held out), as a guard against divergence
            log.warning("%s: every window is a validation window (training.val_steps %s, %d windows of %d+%d "
                        "steps): it trains on them, and early stopping judges training data; lower val_steps "
                        "or give the series more history", self.name, t.val_steps, len(val_starts),
                        self.input_window, self.horizon)
        log.info("%s: %d training and %d validation windows of %d+%d steps over %d series on %s",
                 self.name, len(train_starts), len(val_starts), self.input_window, self.horizon,
                 len(features.series_ids), device)
        self.history = []
        with _GLOBAL_RNG_HELD:
            ensemble = EnsembleNet(self.net_config, members=t.ensemble)  # its init draws too
            for i, member in enumerate(ensemble.members):
                torch.manual_seed(t.seed + i)
                member.load_state_dict(type(member)(self.net_config).state_dict())  # init from this seed
                offset = len(self.history)
                callback = None if on_epoch is None else (lambda e, tr, va, o=offset: on_epoch(o + e, tr, va))
                history = train_network(member, features.data, train_starts, val_starts,
                                        input_window=self.input_window, horizon=self.horizon, training=t,
                                        seed=t.seed + i, device=device, on_epoch=callback)
                # Each member's own epochs (its curve starts again at 1): run on one after
                # another, the members' curves drew one sawtooth in MLflow's chart.
                self.history += [{**h, "member": i + 1} for h in history]
        self.torch_module = ensemble.cpu().eval()
        return self

    def _features(self, panel: pd.DataFrame) -> tuple[SeriesFeatures, Scaler]:
        """Features of the last input_window steps of each series (all a forecast reads)."""
        if self.scaler is None or self.torch_module is None:
            raise ValueError(f"forecaster {self.name!r} is not fitted; call fit() or load_forecaster()")
        check_panel(panel, covariates=self.covariates, min_length=self.input_window,
                    min_length_name="input_window")
        scaler = Scaler.from_dict(self.scaler.to_dict())
        blocks = series_blocks(panel)
        scaler.add_series(panel, blocks=blocks)  # series unseen in training: scaled by their own history
        recent = panel.iloc[tail_rows(blocks, self.input_window)]
        features = build_features(recent, scaler, freq=self.freq, season_length=self.season_length,
                                  covariates=self.covariates, annual_cycle=self.net_config.annual_cycle)
        return features, scaler

    @torch.no_grad()
    def predict(self, panel: pd.DataFrame) -> pd.DataFrame:
        """All series in batches of PREDICT_BATCH windows through the network."""
        features, scaler = self._features(panel)
        x = last_windows(features, self.input_window)  # [series, window, features] float32
        scaled = np.concatenate([
            self.torch_module(x[i:i + PREDICT_BATCH]).numpy()  # [batch, horizon]
            for i in range(0, len(x), PREDICT_BATCH)
        ]) if len(x) else np.empty((0, self.horizon), np.float32)  # [series, horizon]
        values = scaler.unscale_rows(scaled, features.series_ids)  # [series, horizon] float64
        return self._frame(features.series_ids, features.last_ts, values)

    @property
    def covariates_read(self) -> tuple[str, ...]:
        return self.covariates

    def _history_needed(self) -> int:
        return self.input_window

    @property
    def params(self) -> dict[str, Any]:
        t = self.training.model_dump(mode="json")
        t.pop("input_window")
        # What `precision` (auto, say) came to on this host: the same config trains in bf16-mixed
        # on one CPU and float32 on another.
        return {**super().params, **t, "cell": self.name, "input_window": self.input_window,
                "covariates": ",".join(self.covariates), "precision_applied": applied_precision(self.training),
                "epochs_trained": len(self.history)}

    def _state(self) -> dict[str, Any]:
        if self.scaler is None:
            raise ValueError(f"forecaster {self.name!r} is not fitted; nothing to save")
        # JSON keys are text: an int id would come back as '0', every series would look new to
        # the loaded scaler, and be scaled from the history given to predict, not the training's.
        other = next((sid for sid in self.scaler.mean if not isinstance(sid, str)), None)
        if other is not None:
            raise ValueError(f"forecaster {self.name!r}: `series_id` ({other!r}, {type(other).__name__}) must be "
                             "text for the model to be saved and loaded unchanged; cast the ids with astype(str)")
        return {**super()._state(), "input_window": self.input_window,
                "net": self.net_config.to_dict(), "scaler": self.scaler.to_dict(),
                "history": self.history}

    def save(self, directory: Path) -> None:
        super().save(directory)
        torch.save(self.torch_module.state_dict(), Path(directory) / WEIGHTS_FILE)


def make_forecaster(name: str, *, freq: str, horizon: int, season_length: int,
                    training: TrainingConfig, covariates: Sequence[str] = ()) -> Forecaster:
    """A fresh forecaster by name: one of BASELINES or CELLS."""
    check_horizon(horizon)
    kwargs = dict(freq=freq, horizon=horizon, season_length=season_length, training=training,
                  covariates=covariates)
    if name in BASELINES:
        return BaselineForecaster(name, **kwargs)
    if name in CELLS:
        return NeuralForecaster(name, **kwargs)
    raise ValueError(f"`name` ({name!r}) is not a known model; known: {list(BASELINES + CELLS)}")


def load_forecaster(directory: Path) -> Forecaster:
    """Rebuild a saved forecaster from its JSON and (for networks) its state_dict."""
    directory = Path(directory)
    state = json.loads((directory / CONFIG_FILE).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"`format` ({state.get('format')!r}) of {directory / CONFIG_FILE} is not {FORMAT_VERSION}")
    forecaster = make_forecaster(state["name"], freq=state["freq"], horizon=state["horizon"],
                                 season_length=state["season_length"],
                                 training=TrainingConfig.model_validate(state["training"]),
                                 covariates=state["covariates"])
    if isinstance(forecaster, NeuralForecaster):
        forecaster.input_window = int(state["input_window"])
        forecaster.net_config = NetConfig(**state["net"])
        forecaster.scaler = Scaler.from_dict(state["scaler"])
        forecaster.history = list(state["history"])
        with _GLOBAL_RNG_HELD:  # its random init (then overwritten) would shift a fit's draws
            module = EnsembleNet(forecaster.net_config, members=forecaster.training.ensemble)
        weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        module.load_state_dict(weights)
        forecaster.torch_module = module.eval()
    return forecaster
