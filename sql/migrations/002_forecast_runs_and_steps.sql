-- The forecasts table becomes the view `forecasts` over forecast_runs and forecast_steps (see
-- schema.sql for why). schema.sql has created the two empty tables by now; this moves the
-- stored forecasts into them, one run per (dataset, as_of), and drops the table; views.sql then
-- creates the view with the table's columns, so analysts' queries read what they read before.
-- Every write of this pipeline gave all rows of one (dataset, as_of) one model, version and
-- MLflow run. PostgreSQL refuses to drop the table while views of other owners depend on it,
-- and the error names them: drop them, run init-db, then create them again.
DROP VIEW IF EXISTS latest_forecasts;
DROP VIEW IF EXISTS current_forecasts;
DROP VIEW IF EXISTS forecast_accuracy;
INSERT INTO forecast_runs (run_key, dataset, as_of, model, model_version, mlflow_run_id, created_at)
SELECT ROW_NUMBER() OVER (ORDER BY dataset, as_of), dataset, as_of, MIN(model), MIN(model_version),
       MIN(mlflow_run_id), MAX(created_at)
FROM forecasts
GROUP BY dataset, as_of;
INSERT INTO forecast_steps (run_key, series_id, ts, step, value, lower, upper)
SELECT r.run_key, f.series_id, f.ts, f.step, f.value, f.lower, f.upper
FROM forecasts f
JOIN forecast_runs r ON r.dataset = f.dataset AND r.as_of = f.as_of;
DROP TABLE forecasts;
