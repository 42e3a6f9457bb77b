"""Dataset config: required keys, defaults, and errors that name the file, the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forecasting.config import ConfigError, DatasetConfig, Settings, load_config, load_yaml, redact_url

ROOT = Path(__file__).resolve().parent.parent
VALID = {
    "name": "sales",
    "source": {"table": "sales", "id_column": "series_id", "time_column": "month", "target_column": "turnover"},
    "freq": "MS",
    "horizon": 12,
    "season_length": 12,
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def with_source(**changes: object) -> dict:
    source = {**VALID["source"], **changes}
    return {**VALID, "source": {k: v for k, v in source.items() if v is not None}}


@pytest.mark.parametrize("name", ["sales.yaml", "weather.yaml"])
def test_demo_configs_load(name: str) -> None:
    config = DatasetConfig.from_yaml(ROOT / "configs" / name)
    assert config.models == ("rnn", "lstm", "gru")
    assert config.candidates[:3] == ("naive", "seasonal_naive", "ets")


def test_a_query_that_opens_with_a_comment_is_a_select(tmp_path: Path) -> None:
    """It was refused as "must be a SELECT", though the query's wrapping strips comments."""
    query = "-- monthly turnover per store\n/* since 1982 */ SELECT * FROM sales"
    assert load_config(write(tmp_path, with_source(table=None, query=query))).source.query == query
    long = "SELECT * FROM sales WHERE store IN (" + ", ".join(map(str, range(20_000))) + ")"  # > 10,000 tokens
    assert load_config(write(tmp_path, with_source(table=None, query=long))).source.query == long


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.source.table == "sales" and config.source.query is None
    assert config.backtest.windows == 1 and config.validation.policy == "refuse"
    assert config.training.seed == 42


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({**VALID, "horizn": 3}, "horizn", "unknown key"),
        (with_source(query="SELECT * FROM sales"), "source", "exactly one of"),
        (with_source(table=None), "source", "exactly one of"),
        ({**VALID, "freq": "fortnightly"}, "freq", "'fortnightly'"),
        ({**VALID, "freq": "M"}, "freq", "(monthly: MS for month starts, ME for month ends)"),
        ({**VALID, "horizon": 0}, "horizon", "greater than or equal to 1"),
        ({**VALID, "models": ["lstm", "transformer"]}, "models", "transformer"),
        # twice: trained twice, two MLflow runs of one name, score rows overwriting each other
        ({**VALID, "models": ["gru", "lstm", "gru"]}, "models", "names ['gru'] more than once"),
        # past 64 bits torch's seeding failed deep in training, naming neither key nor dataset
        ({**VALID, "training": {"seed": 2**70}}, "training.seed", "less than 4294967296"),
        ({**VALID, "training": {"seed": -1}}, "training.seed", "greater than or equal to 0"),
        (with_source(table='x"; DROP TABLE t;--'), "source.table", "not a valid SQL identifier"),
        (with_source(target_column="turnover; --"), "source.target_column", "not a valid SQL identifier"),
        (with_source(table=None, query="DELETE FROM sales"), "source", "must be a SELECT"),
        # one name for a list: "Input should be a valid tuple"
        ({**VALID, "models": "rnn"}, "models", "`models` ('rnn') must be a list, e.g. [rnn]"),
        (with_source(covariates="temp"), "source.covariates", "`source.covariates` ('temp') must be a list, e.g. [temp]"),
        # the host's zone: the same rows read otherwise on another machine
        (with_source(timezone="localtime"), "source.timezone", "`source.timezone` ('localtime') is the zone of whichever"),
        # YAML's yes/on/true read as 1: `horizon: yes` forecast one step
        ({**VALID, "horizon": True}, "<root>", "`horizon` (True) must be a number, not a yes/no"),
        ({**VALID, "training": {"max_epochs": True}}, "training", "`max_epochs` (True) must be a number"),
        ({**VALID, "training": {"input_window": True}}, "training", "`input_window` (True) must be a number"),
        # the networks' seasonal reference fell back to the last value, silently
        ({**VALID, "training": {"input_window": 6}}, "<root>",
         "`training.input_window` (6) is shorter than `season_length` (12), which `training.residual`"),
        (with_source(table=None, query="-- SELECT\nDELETE FROM sales"), "source", "must be a SELECT"),
        # A covariate written under the long frame's own names would overwrite the target,
        # the ids or the times; one source column in two roles likewise.
        (with_source(covariates=["value"]), "source", "may not name 'value'"),
        (with_source(covariates=["ts"]), "source", "may not name 'ts'"),
        (with_source(covariates=["turnover"]), "source",
         "`source.covariates` ('turnover') is also `source.target_column`"),
        (with_source(covariates=["price", "price"]), "source", "`source.covariates` ('price') is listed twice"),
        (with_source(id_column="month"), "source", "`source.time_column` ('month') is also `source.id_column`"),
        (with_source(timezone="Mars/Olympus"), "source.timezone", "`source.timezone` ('Mars/Olympus') is not an IANA"),
        ({**VALID, "freq": "0D"}, "freq", "`freq` ('0D') must step forward in time"),
        ({**VALID, "freq": "-1D"}, "freq", "`freq` ('-1D') must step forward in time"),
        ({**VALID, "freq": "500ms"}, "freq", "`freq` ('500ms') is finer than whole seconds"),
    ],
)
def test_bad_config_names_file_key_and_value(tmp_path: Path, raw: dict, key: str, fragment: str) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as caught:
        DatasetConfig.from_yaml(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"key `{key}`" in message
    assert fragment in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        DatasetConfig.from_yaml(tmp_path / "nope.yaml")


def test_a_directory_given_as_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the config file cannot be read: Is a directory"):
        DatasetConfig.from_yaml(tmp_path)


def test_a_config_not_in_utf8_is_named(tmp_path: Path) -> None:
    """Latin-1 bytes raised a bare UnicodeDecodeError (a ValueError), which the CLI printed
    without the file; `serve` let it through its config check. Any locale reads UTF-8 alike."""
    path = tmp_path / "sales.yaml"
    path.write_bytes("name: ventes-é\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"sales.yaml: not UTF-8 text: byte 0xe9 at offset 13"):
        DatasetConfig.from_yaml(path)


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: a second `training:` block silently dropped the
    first (hidden_size 8 became the default 64)."""
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(VALID, sort_keys=False)
                    + "training:\n  hidden_size: 8\ntraining:\n  max_epochs: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: key 'training' is given twice, on lines "
                                          r"\d+ and \d+"):
        DatasetConfig.from_yaml(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump(VALID, sort_keys=False) + "training:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        DatasetConfig.from_yaml(nested)
    assert DatasetConfig.from_yaml(write(tmp_path, VALID)).name == VALID["name"]  # one of each: read as before
    inline = tmp_path / "inline.yaml"
    inline.write_text(yaml.safe_dump(VALID, sort_keys=False) + "training: {seed: 1, seed: 2}\n")
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        DatasetConfig.from_yaml(inline)
    # merge keys reuse a block, as prefect.yaml files do; 1 and "1" are two keys
    assert load_yaml("base: &b {x: 1, y: 2}\nd: {<<: *b, y: 3}\ne:\n  <<: [*b]\n  x: 5\nf: {1: a, '1': b}\n") == {
        "base": {"x": 1, "y": 2}, "d": {"x": 1, "y": 3}, "e": {"x": 5, "y": 2}, "f": {1: "a", "1": "b"}}


@pytest.mark.parametrize(("url", "problem"), [
    ("notaurl", "is not a database URL, such as sqlite:///forecasting.db"),
    ("mysql://app:s3cr3t-SENTINEL@db/prod", "'mysql' is not supported; use sqlite or postgresql"),
    ("postgresql+nodriver://app@db/prod", "SQLAlchemy knows no driver 'nodriver' for postgresql"),
], ids=["not-a-url", "mysql", "unknown-driver"])
def test_a_database_url_that_cannot_be_used_is_named(url: str, problem: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLAlchemy's ArgumentError, or ModuleNotFoundError: MySQLdb, came as tracebacks of init-db
    (or of any command) naming no setting."""
    from forecasting.cli import main

    monkeypatch.setenv("FORECASTING_DATABASE_URL", url)
    assert main(["init-db"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "error: FORECASTING_DATABASE_URL (" in out and problem in out
    assert "s3cr3t-SENTINEL" not in out


def test_pydantics_own_message_never_quotes_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings() fails where no CLI unwraps it (a flow run's or a worker's import): pydantic
    appended `input_value=` with the URL, password and all."""
    from pydantic import ValidationError

    monkeypatch.setenv("FORECASTING_DATABASE_URL", "mysql://app:s3cr3t-SENTINEL@db/prod")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "'mysql' is not supported" in str(caught.value) and "s3cr3t-SENTINEL" not in str(caught.value)


def test_a_database_url_whose_driver_is_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def without_psycopg2(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] == "psycopg2":
            raise ModuleNotFoundError("No module named 'psycopg2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_psycopg2)
    monkeypatch.setenv("FORECASTING_DATABASE_URL", "postgresql+psycopg2://app@db/prod")
    with pytest.raises(ValueError, match=r"its driver 'psycopg2' is not installed .*use postgresql\+psycopg://"):
        Settings()


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORECASTING_DATABASE_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert Settings().database_url == "sqlite:///forecasting.db"
    assert Settings().mlflow_tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("FORECASTING_DATABASE_URL", "postgresql+psycopg://app:s3cr3t-SENTINEL@db:5432/prod")
    settings = Settings()
    assert settings.database_url.endswith("@db:5432/prod")
    assert "s3cr3t-SENTINEL" not in settings.safe_database_url
    assert "s3cr3t-SENTINEL" not in redact_url("weird://u:s3cr3t-SENTINEL@host")
