-- Views for analysts, created by `forecasting init-db` on SQLite and PostgreSQL.
-- DROP + CREATE keeps them idempotent and lets a new release change their columns. On
-- PostgreSQL, init-db replaces each in place instead (db.apply_views), so that views built on
-- them survive.

-- One row per forecast step: every stored forecast, with the columns of the table it replaced
-- (schema.sql). A step whose run is gone is not shown.
DROP VIEW IF EXISTS forecasts;
CREATE VIEW forecasts AS
SELECT
    r.dataset,
    s.series_id,
    r.as_of,
    s.ts,
    s.step,
    s.value,
    s.lower,
    s.upper,
    r.model,
    r.model_version,
    r.mlflow_run_id,
    r.created_at
FROM forecast_steps s
JOIN forecast_runs r ON r.run_key = s.run_key;

-- Per dataset and series, the rows of the newest as_of: a series the newest run did not
-- forecast (dropped by validation, gone from the source) keeps its last forecast here; see
-- current_forecasts for the newest run's alone.
DROP VIEW IF EXISTS latest_forecasts;
CREATE VIEW latest_forecasts AS
SELECT f.*
FROM forecasts f
JOIN (
    SELECT dataset, series_id, MAX(as_of) AS as_of
    FROM forecasts
    GROUP BY dataset, series_id
) newest
  ON newest.dataset = f.dataset AND newest.series_id = f.series_id AND newest.as_of = f.as_of;

-- Per dataset, the rows of its newest as_of only: what the newest run forecast. The newest
-- as_of comes from forecast_runs, one row per as_of (from `forecasts`, one per step, it read
-- every step ever stored).
DROP VIEW IF EXISTS current_forecasts;
CREATE VIEW current_forecasts AS
SELECT f.*
FROM forecasts f
JOIN (
    SELECT dataset, MAX(as_of) AS as_of
    FROM forecast_runs
    GROUP BY dataset
) newest
  ON newest.dataset = f.dataset AND newest.as_of = f.as_of;

-- Every past forecast joined to its actual once that has landed (and been read by a run).
DROP VIEW IF EXISTS forecast_accuracy;
CREATE VIEW forecast_accuracy AS
SELECT
    f.dataset,
    f.series_id,
    f.as_of,
    f.ts,
    f.step,
    f.model,
    f.model_version,
    f.value AS forecast,
    a.value AS actual,
    a.value - f.value AS error,
    -- in percent, as model_scores.smape is (a fraction here was 100x off beside it)
    CASE WHEN a.value = 0 THEN NULL ELSE 100.0 * ABS(a.value - f.value) / ABS(a.value) END
        AS absolute_percentage_error,
    -- 1.0 or 0.0, a float on both databases: AVG of an integer is `numeric` on PostgreSQL (a
    -- Decimal in Python, which pandas keeps as object) where SQLite gives a float
    CASE WHEN f.lower IS NULL OR f.upper IS NULL THEN NULL  -- no interval: not a miss
         WHEN a.value BETWEEN f.lower AND f.upper THEN CAST(1 AS DOUBLE PRECISION)
         ELSE CAST(0 AS DOUBLE PRECISION) END AS inside_interval
FROM forecasts f
JOIN actuals a
  ON a.dataset = f.dataset AND a.series_id = f.series_id AND a.ts = f.ts;

-- Per dataset and model: backtest MASE over the last 10 runs (as_of) and how often it won.
-- mean_mase and best_mase are over the runs it was scored in (scored_runs); a run whose
-- backtest forecast a non-finite value has no MASE and counts in failed_runs, so a model that
-- failed most nights does not top the board on its few scored ones unseen.
DROP VIEW IF EXISTS model_leaderboard;
CREATE VIEW model_leaderboard AS
SELECT
    dataset,
    model,
    COUNT(*) AS runs,
    AVG(mase) AS mean_mase,
    MIN(mase) AS best_mase,
    SUM(CASE WHEN is_champion THEN 1 ELSE 0 END) AS times_champion,
    MAX(as_of) AS last_as_of,
    COUNT(mase) AS scored_runs,
    SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed_runs
FROM (
    SELECT s.*, DENSE_RANK() OVER (PARTITION BY dataset ORDER BY as_of DESC) AS recency
    FROM model_scores s
    WHERE series_id IS NULL
) recent
WHERE recency <= 10
GROUP BY dataset, model;
