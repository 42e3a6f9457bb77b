"""Configuration: the dataset config (YAML, CLI and flow parameters share it) and Settings (env).

A dataset config is the one contract between a team's tables and the pipeline. Every key is
validated up front so that a typo fails before a night's training starts, with an error that
names the file, the key and the value.
"""

from __future__ import annotations

import math
import re
import types
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd
import yaml
from pandas.tseries.frequencies import to_offset
from pandas.tseries.offsets import Tick
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError

# Table and column names end up in SQL as identifiers (they cannot be bound parameters), so they
# must match this strict pattern; values are always bound parameters.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# Dataset names become MLflow experiment and registered-model names and a `dataset` column value.
DATASET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")

CELLS = ("rnn", "lstm", "gru")
BASELINES = ("naive", "seasonal_naive", "ets")


class ConfigError(ValueError):
    """A dataset config that cannot be used; the message names the file, the key and the value."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping. YAML says keys are
    unique and PyYAML silently keeps the last: a second `training:` block dropped the first."""


def _mapping_of_unique_keys(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[tuple[str, Any], yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: construct_mapping merges it
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.setdefault((type(key).__name__, key), key_node.start_mark)  # 1 and true apart
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if first is not key_node.start_mark:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice, on lines {first.line + 1} and "
                f"{key_node.start_mark.line + 1} (YAML would keep only the last)", key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_of_unique_keys)


def load_yaml(text: str) -> Any:
    """yaml.safe_load of `text`, refusing a mapping key given twice (yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


class SettingError(ValueError):
    """A setting (environment variable or command-line option) that cannot be used, whatever the
    dataset config; the message names the setting and its value."""


# Comments and blank space before a query's first word: what `-- daily totals` puts before its SELECT
_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)


def _without_comments(sql: str) -> str:
    """`sql` from its first word on: a query that opens with `-- daily totals` is still a SELECT.
    Not sqlparse: it refuses a query past 10,000 tokens (a long IN list)."""
    return _LEADING_COMMENTS.sub("", sql, count=1)


def check_identifier(value: str, *, key: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise ValueError(
            f"`{key}` ({value!r}) is not a valid SQL identifier: "
            "use letters, digits and underscores, starting with a letter or underscore"
        )
    return value


# The columns of the long frame every stage reads (db.to_long_frame), and what each holds.
LONG_FRAME_COLUMNS = {"series_id": "series ids", "ts": "timestamps", "value": "target"}


class _Strict(BaseModel):
    # Unknown keys are refused: a misspelt optional key would otherwise be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_for_numbers(cls, raw: Any) -> Any:
        """YAML reads yes, on and true as True, which pydantic took for 1: `horizon: yes`
        forecast one step, silently."""
        if isinstance(raw, dict):
            for name, value in raw.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field is not None and _is_number(field.annotation):
                    raise ValueError(f"`{name}` ({value!r}) must be a number, not a yes/no (YAML reads yes, on and "
                                     "true as true)")
        return raw


def _a_list(value: Any, *, key: str) -> Any:
    """A list key given one name (`models: rnn`) was refused as "Input should be a valid tuple"."""
    if isinstance(value, str):
        raise ValueError(f"`{key}` ({value!r}) must be a list, e.g. [{value}]")
    return value


def _is_number(annotation: Any) -> bool:
    """int or float, or either or None."""
    import typing

    return annotation in (int, float) or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                          and bool({int, float} & set(typing.get_args(annotation))))


class SourceConfig(_Strict):
    """Where the series come from: a table or a SELECT, and which columns mean what."""

    table: str | None = None  # a table (or view) of the configured database
    query: str | None = None  # or a SELECT; exactly one of table/query
    id_column: str | None = None  # absent: the source holds one series, named after the dataset
    time_column: str
    target_column: str
    covariates: tuple[str, ...] = ()  # numeric columns fed to the networks as extra inputs
    # The zone whose wall clock the series follow. Time-zone aware source values (PostgreSQL
    # timestamptz) are shown in it, then stored naive, as are `as_of` and the forecasts' `ts`.
    # UTC suits hourly data (no daylight-saving jumps); daily or monthly data kept as local
    # midnights in a timestamptz need their zone, or each would read as the day before at 23:00.
    timezone: str = "UTC"

    @field_validator("table", "id_column", "time_column", "target_column")
    @classmethod
    def _identifier(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else check_identifier(value, key=f"source.{info.field_name}")

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if value.strip().lower() == "localtime":  # the host's zone: the same data read otherwise elsewhere
            raise ValueError("`source.timezone` ('localtime') is the zone of whichever host runs the night; name "
                             "the zone the data was recorded in, e.g. 'UTC' or 'Europe/Berlin'")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"`source.timezone` ({value!r}) is not an IANA time zone, e.g. "
                             "'UTC' or 'Europe/Berlin'") from None
        return value

    @field_validator("covariates", mode="before")
    @classmethod
    def _covariates_listed(cls, value: Any) -> Any:
        return _a_list(value, key="source.covariates")

    @field_validator("covariates")
    @classmethod
    def _covariate_identifiers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for column in value:
            check_identifier(column, key="source.covariates")
        return value

    @model_validator(mode="after")
    def _table_xor_query(self) -> SourceConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError(
                f"exactly one of `source.table` ({self.table!r}) and `source.query` "
                f"({self.query!r}) must be given"
            )
        if self.query is not None and not re.match(r"^\s*(select|with)\b", _without_comments(self.query), re.I):
            raise ValueError(f"`source.query` ({self.query!r}) must be a SELECT (or WITH ... SELECT)")
        return self

    @model_validator(mode="after")
    def _distinct_columns(self) -> SourceConfig:
        # The long frame holds the columns `series_id`, `ts` and `value` beside each covariate
        # under its own name: a covariate by one of those names, or one source column in two
        # roles, would silently overwrite the target, the ids or the times.
        roles = [("source.id_column", self.id_column), ("source.time_column", self.time_column),
                 ("source.target_column", self.target_column)]
        roles += [("source.covariates", column) for column in self.covariates]
        seen: dict[str, str] = {}
        for key, column in roles:
            if column is None:
                continue
            if column in seen:
                also = "is listed twice" if seen[column] == key else f"is also `{seen[column]}`"
                raise ValueError(f"`{key}` ({column!r}) {also}: each source column may have one role")
            seen[column] = key
        reserved = [c for c in self.covariates if c in LONG_FRAME_COLUMNS]
        if reserved:
            raise ValueError(f"`source.covariates` ({list(self.covariates)!r}) may not name "
                             f"{reserved[0]!r}: the pipeline's own column of that name holds the "
                             f"{LONG_FRAME_COLUMNS[reserved[0]]}; rename it in a `source.query`")
        return self


def default_input_window(horizon: int, season_length: int) -> int:
    """A multiple of the season covering at least three seasons and the horizon."""
    return season_length * max(3, math.ceil(horizon / season_length))


class TrainingConfig(_Strict):
    """Budget and shape of the recurrent forecasters; shared by rnn, lstm and gru."""

    input_window: int | None = Field(default=None, ge=1)  # None: season_length * max(3, ceil(horizon / season_length))
    hidden_size: int = Field(default=64, ge=1)
    num_layers: int = Field(default=1, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    strategy: Literal["direct", "recursive"] = "direct"
    residual: Literal["seasonal_naive", "last_value", "none"] = "seasonal_naive"  # what the net corrects
    scaling: Literal["auto", "log", "standard"] = "auto"  # auto: log1p when all values >= 0, then per series
    scale_by: Literal["std", "seasonal_diff"] = "seasonal_diff"  # per-series divisor: std, or mean
    #   |y_t - y_t-season| (the MASE denominator, so the loss in scaled space tracks MASE)
    local_level: bool = True  # networks see the target relative to their window's last-season mean
    # Two more inputs: sin/cos of the position in the calendar year. For daily or hourly data
    # whose level follows the year (temperature, heating, holidays), which a season of
    # `season_length` steps cannot express; monthly data have it in a 12-step season already.
    annual_cycle: bool = False
    loss: Literal["mae", "mse", "huber"] = "mae"  # in scaled space
    # Defaults sized for ~150 monthly series in ~20 s per cell on 2 CPU cores (aus_retail: each
    # cell 0.84-0.87x seasonal-naive MASE over seeds 1, 7, 42); raise max_epochs or
    # max_batches_per_epoch for bigger budgets.
    max_epochs: int = Field(default=12, ge=1)  # the training budget
    max_batches_per_epoch: int | None = Field(default=40, ge=1)  # random windows per epoch; None: all
    batch_size: int = Field(default=512, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0.0)
    patience: int = Field(default=4, ge=1)  # epochs without validation improvement before stopping
    val_steps: int | None = Field(default=1, ge=1)  # windows whose target ends in the last val_steps
    #   steps of each series validate (early stopping); None: horizon. Training targets end
    #   before the first validation target, so each extra step costs a training window.
    grad_clip: float = Field(default=1.0, gt=0.0)
    ensemble: int = Field(default=1, ge=1)  # networks per cell, each with its own seed, averaged
    seed: int = Field(default=42, ge=0, lt=2**32)  # with ensemble members' seed + i: within every RNG's range
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Precision of the matrix products in CPU training (the direct strategy's kernel). bf16-mixed:
    # they take bfloat16 copies of their inputs and their outputs are widened back to float32;
    # state, activations, weights and Adam stay float32. 3-4x faster products where the CPU
    # multiplies bfloat16 natively (avx512_bf16, AMX), but 8-12x slower training where it does
    # not (emulated). auto: bf16-mixed on such a CPU where its training steps measured clearly
    # faster than float32's (forecasting.precision_probe, once per machine; not on an Intel Xeon
    # with AMX, 2026-12-07), float32 on any other CPU and on CUDA.
    precision: Literal["auto", "float32", "bf16-mixed"] = "auto"

    def resolved(self, *, horizon: int, season_length: int) -> TrainingConfig:
        """These settings with the defaults that depend on the dataset filled in: what the
        networks are built and trained with, and what a comparison of settings compares."""
        return self.model_copy(update={
            "input_window": self.input_window or default_input_window(horizon, season_length),
            "val_steps": self.val_steps or horizon,
        })


class BacktestConfig(_Strict):
    windows: int = Field(default=1, ge=1)  # k rolling origins of `horizon` steps at the end
    retrain: bool = True  # retrain each candidate at every origin, or fit once at the first


class ValidationConfig(_Strict):
    # refuse: fail the run; fill: interpolate gaps/NaN; drop: forecast the other series only.
    policy: Literal["refuse", "fill", "drop"] = "refuse"
    # drop: the most of the series a night may leave out; above it the night fails, rather than
    # train, compare and promote on a remnant (e.g. one series loaded early moved as_of, and
    # every other one then "ended before as_of").
    max_dropped_share: float = Field(default=0.5, ge=0.0, le=1.0)


class DatasetConfig(_Strict):
    """One dataset: what to read, how often it ticks, what to forecast and with what."""

    name: str
    source: SourceConfig
    freq: str  # pandas offset alias, e.g. MS, D, h
    horizon: int = Field(ge=1)  # n: steps to forecast
    season_length: int = Field(ge=1)  # for seasonal naive, MASE and calendar features
    models: tuple[str, ...] = CELLS  # recurrent cells to compare; baselines are always scored
    interval_level: float = Field(default=0.8, gt=0.0, lt=1.0)
    training: TrainingConfig = TrainingConfig()
    backtest: BacktestConfig = BacktestConfig()
    validation: ValidationConfig = ValidationConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not DATASET_NAME.match(value):
            raise ValueError(
                f"`name` ({value!r}) must start with a letter and hold only letters, digits, "
                "'_', '-' or '.'"
            )
        return value

    @field_validator("freq")
    @classmethod
    def _freq(cls, value: str) -> str:
        try:
            offset = to_offset(value)
        except ValueError as exc:
            reason = str(exc).splitlines()[0].split(". Failed to parse")[0]
            monthly = " (monthly: MS for month starts, ME for month ends)" if value.strip().upper() in ("M", "MONTHLY") else ""
            raise ValueError(f"`freq` ({value!r}) is not a pandas offset alias{monthly}; e.g. MS, ME, W-MON, D, h "
                             f"(pandas: {reason})") from None
        if offset.n < 1:
            raise ValueError(f"`freq` ({value!r}) must step forward in time (a multiple of at least 1)")
        # Tick offsets (h, min, s, ms, ...) have a fixed length; finer than a second cannot be
        # stored: the output tables keep timestamps to the second (SQLite's format included).
        if isinstance(offset, Tick) and offset.nanos % 1_000_000_000:
            raise ValueError(f"`freq` ({value!r}) is finer than whole seconds; forecast tables keep "
                             "timestamps to the second")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models_listed(cls, value: Any) -> Any:
        return _a_list(value, key="models")

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in value if m not in CELLS]
        if unknown:
            raise ValueError(f"`models` ({list(value)!r}) holds unknown cells {unknown}; known: {list(CELLS)}")
        if not value:
            raise ValueError("`models` must name at least one of " + ", ".join(CELLS))
        twice = sorted({m for m in value if value.count(m) > 1})
        if twice:  # each would train again, and their runs and score rows would overwrite each other
            raise ValueError(f"`models` ({list(value)!r}) names {twice} more than once")
        return value

    @model_validator(mode="after")
    def _window_holds_a_season(self) -> DatasetConfig:
        # The networks' reference is the window's last season: a window shorter than the season
        # fell back to the last value, silently, while MLflow still logged seasonal_naive.
        t = self.training
        if t.input_window is not None and t.residual == "seasonal_naive" and t.input_window < self.season_length:
            raise ValueError(f"`training.input_window` ({t.input_window}) is shorter than `season_length` "
                             f"({self.season_length}), which `training.residual` ('seasonal_naive') needs in the "
                             "window: lengthen the window, or set training.residual to 'last_value'")
        return self

    @property
    def candidates(self) -> tuple[str, ...]:
        """Every model scored in a comparison: baselines first (ties go to the simpler model)."""
        return BASELINES + self.models

    @classmethod
    def from_yaml(cls, path: str | Path) -> DatasetConfig:
        path = Path(path)
        try:
            raw = load_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except OSError as exc:  # a directory, no permission
            raise ConfigError(f"{path}: the config file cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:  # a ValueError, which the CLI would print bare, without the file
            raise ConfigError(f"{path}: not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset "
                              f"{exc.start} cannot be decoded; save the config as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
        return cls.from_mapping(raw, origin=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, origin: str = "<config>") -> DatasetConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc, origin=origin)) from None


def describe_validation_error(exc: ValidationError, *, origin: str) -> str:
    """One line per problem: `file: key `a.b` (value 'x'): reason`."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (value {value!r})"
        lines.append(f"{origin}: key `{key}`{shown}: {reason}")
    return "\n".join(lines)


def load_config(config: DatasetConfig | str | Path | dict[str, Any]) -> DatasetConfig:
    """Accept what a flow parameter may hold: the model itself, a YAML path, or a mapping."""
    if isinstance(config, DatasetConfig):
        return config
    if isinstance(config, dict):  # a flow parameter: named after the dataset it says it is
        name = config.get("name")
        return DatasetConfig.from_mapping(config, origin=f"config of dataset {name!r}" if name else "<config>")
    return DatasetConfig.from_yaml(config)


LOCAL_DASK = "local"  # the Dask address meaning: a LocalCluster started for the run


def check_dask_address(address: str, *, name: str, reachable: bool = False) -> str:
    """`address` if it is LOCAL_DASK or a scheduler address with a port (tcp://host:8786), and
    with `reachable`, a scheduler that accepts a connection within 5 s.

    Checked before the flow starts: Dask's own error ("missing port number in address
    'Local'") came after Prefect's start-up and named neither the setting nor the option.
    """
    if address == LOCAL_DASK:
        return address
    from distributed.comm import parse_address, parse_host_port  # only where an address is set

    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError as exc:
        raise SettingError(f"{name} ({address!r}) is neither {LOCAL_DASK!r} nor a Dask scheduler address "
                           f"such as tcp://host:8786: {exc}") from None
    if reachable:  # else the flow waits 30 s for it, after Prefect's start-up, then fails
        import socket

        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise SettingError(f"{name} ({address!r}): no Dask scheduler answers there: {exc}") from None
    return address


class Settings(BaseSettings):
    """Where the pipeline reads and writes; from the environment, with embedded defaults."""

    # hide_input_in_errors: pydantic's message would quote the value, a URL with its password
    model_config = SettingsConfigDict(extra="ignore", hide_input_in_errors=True)

    forecasting_database_url: str = "sqlite:///forecasting.db"
    mlflow_tracking_uri: str = "sqlite:///mlflow.db"
    # Unset: every task runs in the flow's process, as always. "local": training and per-series
    # shards run on a Dask LocalCluster started for the run; else a scheduler, tcp://host:8786.
    forecasting_dask_address: str | None = None

    @field_validator("forecasting_dask_address")
    @classmethod
    def _dask_address(cls, value: str | None) -> str | None:
        return check_dask_address(value, name="FORECASTING_DASK_ADDRESS") if value else None

    @field_validator("forecasting_database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """A SQLite or PostgreSQL URL whose driver is installed: else SQLAlchemy's ArgumentError,
        or a ModuleNotFoundError (MySQLdb, psycopg2), came as a traceback naming no setting."""
        shown = f"FORECASTING_DATABASE_URL ({redact_url(value)!r})"
        try:
            url = make_url(value)
        except Exception:  # noqa: BLE001 - SQLAlchemy's ArgumentError, a ValueError for a bad port
            raise SettingError(f"{shown} is not a database URL, such as sqlite:///forecasting.db or "
                               "postgresql+psycopg://user@host:5432/dbname") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise SettingError(f"{shown}: {url.get_backend_name()!r} is not supported; use sqlite or postgresql")
        try:
            url.get_dialect().import_dbapi()
        except NoSuchModuleError:
            raise SettingError(f"{shown}: SQLAlchemy knows no driver {url.get_driver_name()!r} for "
                               f"{url.get_backend_name()}; for PostgreSQL use postgresql+psycopg://") from None
        except ImportError as exc:
            raise SettingError(f"{shown}: its driver {url.get_driver_name()!r} is not installed ({exc}); for "
                               "PostgreSQL use postgresql+psycopg://, whose driver the pipeline installs") from None
        return value

    @property
    def database_url(self) -> str:
        return self.forecasting_database_url

    @property
    def safe_database_url(self) -> str:
        """The URL with its password masked, for logs and errors."""
        return redact_url(self.forecasting_database_url)


def redact_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: hide anything between ':' and '@'
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def scrub(text: str, url: str) -> str:
    """`text` without the password of `url` (plain or percent-encoded): for error messages."""
    from urllib.parse import quote, unquote, urlsplit

    try:
        password = urlsplit(url).password or ""
    except ValueError:
        password = ""
    for secret in {password, unquote(password), quote(unquote(password), safe="")} - {""}:
        text = text.replace(secret, "***")
    return text


def parse_as_of(as_of: str | datetime | None, timezone: str = "UTC", *, name: str = "as_of") -> pd.Timestamp | None:
    """`as_of` (ISO 8601) as a naive timestamp on the wall clock of `timezone`; None for none."""
    if as_of is None or as_of == "":
        return None
    try:
        # ISO 8601 only: pandas alone would also read 'now', 'NaT' and '01/02/2019' (2 January)
        parsed = pd.Timestamp(datetime.fromisoformat(as_of) if isinstance(as_of, str) else as_of)
        if pd.isna(parsed):
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError(
            f"`{name}` ({as_of!r}) is not an ISO 8601 date or date-time, e.g. 2017-12-01"
        ) from None
    # Source timestamps are compared on the dataset's wall clock, naive (see db.naive_times).
    return parsed.tz_convert(timezone).tz_localize(None) if parsed.tzinfo is not None else parsed
