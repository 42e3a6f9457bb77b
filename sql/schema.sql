-- The pipeline's own tables. Applied by `forecasting init-db`; every statement is idempotent and
-- written in the SQL that SQLite and PostgreSQL share. Statements are separated by ';' at the end
-- of a line.

-- A night's forecast is stored as one row of forecast_runs (which dataset and as_of, which
-- model made it) and its rows of forecast_steps (one per series and step). Analysts read the
-- view `forecasts` (views.sql), which joins the two into one row per forecast step.
--
-- Why two tables, not one keyed by (dataset, series_id, as_of, ts): a rerun of an as_of
-- replaces its rows in one transaction, and under that key every new row met its deleted twin,
-- still in the unique index until commit, and was inserted among them: a rerun of 1,000,000
-- rows cost 2.9x a first write (benchmarks/rerun_key_designs.sql). Each write gets a new
-- run_key here, so its steps go in at the index's edge and a rerun costs a first write plus
-- the DELETE. The database still holds at most one forecast per (dataset, series, as_of, ts):
-- forecast_runs at most one run per (dataset, as_of), and a run at most one step per
-- (series_id, ts). forecast_steps has no FOREIGN KEY to its run, on purpose: PostgreSQL checks
-- one row by row, which cost as much as the twins; `forecasting`'s write_run deletes a run's
-- steps with it, and the view shows only steps whose run exists.

-- One row per (dataset, as_of) forecast. `as_of` is the last timestamp of the data the
-- forecast used. run_key: the write's own key (increasing with the time of the write).
CREATE TABLE IF NOT EXISTS forecast_runs (
    run_key        BIGINT           NOT NULL,
    dataset        VARCHAR(64)      NOT NULL,
    as_of          TIMESTAMP        NOT NULL,
    model          VARCHAR(64)      NOT NULL,
    model_version  VARCHAR(32),
    mlflow_run_id  VARCHAR(64),
    created_at     TIMESTAMP        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT forecast_runs_pkey PRIMARY KEY (run_key),
    CONSTRAINT forecast_runs_key UNIQUE (dataset, as_of)
);

-- One row per series and forecast step of a run: ts = as_of + step * freq.
CREATE TABLE IF NOT EXISTS forecast_steps (
    run_key        BIGINT           NOT NULL,
    series_id      VARCHAR(255)     NOT NULL,
    ts             TIMESTAMP        NOT NULL,
    step           INTEGER          NOT NULL CHECK (step >= 1),
    value          DOUBLE PRECISION NOT NULL,
    lower          DOUBLE PRECISION,
    upper          DOUBLE PRECISION,
    CONSTRAINT forecast_steps_pkey PRIMARY KEY (run_key, series_id, ts)
);

-- Backtest scores of every candidate of a run: one row per series and one aggregate row per
-- model. The aggregate row has series_id NULL; the key uses series_key (series_id, or '' for the
-- aggregate) because NULLs never collide in a UNIQUE constraint, so they cannot be upserted.
-- A series that validation dropped (policy `drop`) gets one row with status 'dropped', the
-- model that forecast the others, NULL scores and the failed check in `detail`. A model that
-- forecast non-finite values in the backtest has status 'failed' and NULL scores.
CREATE TABLE IF NOT EXISTS model_scores (
    dataset        VARCHAR(64)      NOT NULL,
    as_of          TIMESTAMP        NOT NULL,
    model          VARCHAR(64)      NOT NULL,
    series_key     VARCHAR(255)     NOT NULL,
    series_id      VARCHAR(255),
    mae            DOUBLE PRECISION,
    rmse           DOUBLE PRECISION,
    smape          DOUBLE PRECISION,
    mase           DOUBLE PRECISION,
    interval_coverage DOUBLE PRECISION,  -- aggregate rows: share of actuals inside the interval
    is_champion    BOOLEAN          NOT NULL DEFAULT FALSE,
    status         VARCHAR(16)      NOT NULL DEFAULT 'scored',  -- scored | dropped | failed
    detail         VARCHAR(1000),                               -- why a series was dropped or failed
    mlflow_run_id  VARCHAR(64),
    created_at     TIMESTAMP        NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT model_scores_key UNIQUE (dataset, as_of, model, series_key),
    CONSTRAINT model_scores_aggregate CHECK ((series_key = '') = (series_id IS NULL))
);

-- The actuals the pipeline read, kept so that `forecast_accuracy` stays a plain SQL view
-- whatever each dataset's source table is called. Each run upserts the observations that can
-- match a stored forecast (ts after the dataset's oldest forecast as_of).
CREATE TABLE IF NOT EXISTS actuals (
    dataset    VARCHAR(64)      NOT NULL,
    series_id  VARCHAR(255)     NOT NULL,
    ts         TIMESTAMP        NOT NULL,
    value      DOUBLE PRECISION NOT NULL,
    loaded_at  TIMESTAMP        NOT NULL DEFAULT CURRENT_TIMESTAMP,  -- when this value was recorded (new or restated)
    CONSTRAINT actuals_key PRIMARY KEY (dataset, series_id, ts)
);

-- Which files of sql/migrations/ a database has had applied. A new database gets schema.sql
-- as it is now and every migration marked applied; an older one gets the missing migrations.
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        VARCHAR(128)  NOT NULL PRIMARY KEY,
    applied_at  TIMESTAMP     NOT NULL DEFAULT CURRENT_TIMESTAMP
);
