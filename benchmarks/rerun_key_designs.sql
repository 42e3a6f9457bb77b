-- What a rerun of a night (DELETE the as_of's rows, INSERT new ones, one transaction) costs on
-- PostgreSQL under five designs of the forecasts table, for the owner's schema decision
-- (issue #7: write_run's rerun measured 2.94x COPY against a target of 2x).
--
--     psql -h 127.0.0.1 -U postgres -d DBNAME -f benchmarks/rerun_key_designs.sql
--
-- It creates and drops rd_* tables only. 1,000,000 rows, keys in
-- key order (series-000000..), as write_speed.py writes them. Compare the INSERT lines within one
-- run (the machine is shared): the first write into an empty table against the rerun's INSERT.
--   a. today's schema: UNIQUE (dataset, series_id, as_of, ts). A rerun's every new key meets
--      its deleted twin in the unique index (dead only once the transaction commits), and is
--      inserted among them instead of at the index's right edge.
--   b. a run key: each write gets a new run_key, UNIQUE (run_key, series_id, ts); a run table
--      holds UNIQUE (dataset, as_of). No twin meets a new key; but nothing in the database ties
--      a row's (dataset, as_of) to its run's: uniqueness of the natural key rests on write_run.
--   c. b with that tie as a FOREIGN KEY (run_key, dataset, as_of): PostgreSQL checks it row by
--      row, which costs about as much as the twins.
--   d. today's key, the table at fillfactor 50, and the rerun as one INSERT ... ON CONFLICT DO
--      UPDATE (no DELETE): each page keeps room for a new version of every row on it, so each
--      update is HOT (no new index entry). The price: the table is twice its size, for good.
--   e. today's key with its unique index at fillfactor 50: the rerun's twins fit beside the
--      deleted entries without page splits. The price: that index is about twice its size.
\timing on
\set ON_ERROR_STOP on
DROP TABLE IF EXISTS rd_natural, rd_run_key, rd_run_key_fk, rd_runs, rd_hot, rd_index_room, rd_rows, rd_shape;
-- sql/schema.sql's forecasts columns, without its constraints (each design adds its own).
CREATE TABLE rd_shape (
    dataset VARCHAR(64) NOT NULL, series_id VARCHAR(255) NOT NULL, as_of TIMESTAMP NOT NULL,
    ts TIMESTAMP NOT NULL, step INTEGER NOT NULL CHECK (step >= 1), value DOUBLE PRECISION NOT NULL,
    lower DOUBLE PRECISION, upper DOUBLE PRECISION, model VARCHAR(64) NOT NULL, model_version VARCHAR(32),
    mlflow_run_id VARCHAR(64), created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE rd_rows AS
SELECT 'bench'::varchar(64) AS dataset, 'series-' || lpad((i / 100)::text, 6, '0') AS series_id,
       timestamp '2024-05-31 23:00' AS as_of, timestamp '2024-05-31 23:00' + ((i % 100) + 1) * interval '1 hour' AS ts,
       (i % 100) + 1 AS step, random() AS value, random() AS lower, random() AS upper, 'gru'::varchar(64) AS model,
       '3'::varchar(32) AS model_version, md5(i::text)::varchar(64) AS mlflow_run_id, now()::timestamp AS created_at
FROM generate_series(0, 999999) AS i;
VACUUM ANALYZE rd_rows;

\echo '--- a. natural key (today): first write, then the rerun (DELETE, INSERT)'
CREATE TABLE rd_natural (LIKE rd_shape INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE rd_natural ADD UNIQUE (dataset, series_id, as_of, ts);
CREATE INDEX ON rd_natural (dataset, as_of);
CHECKPOINT;
INSERT INTO rd_natural SELECT * FROM rd_rows;
CHECKPOINT;
BEGIN;
DELETE FROM rd_natural WHERE dataset = 'bench' AND as_of = '2024-05-31 23:00';
INSERT INTO rd_natural SELECT * FROM rd_rows;
COMMIT;
DROP TABLE rd_natural;

\echo '--- b. run key, no foreign key: first write, then the rerun (DELETE, INSERT under a new run_key)'
CREATE TABLE rd_run_key (run_key BIGINT NOT NULL, LIKE rd_shape INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE rd_run_key ADD UNIQUE (run_key, series_id, ts);
CREATE INDEX ON rd_run_key (dataset, as_of);
CHECKPOINT;
INSERT INTO rd_run_key SELECT 1, * FROM rd_rows;
CHECKPOINT;
BEGIN;
DELETE FROM rd_run_key WHERE dataset = 'bench' AND as_of = '2024-05-31 23:00';
INSERT INTO rd_run_key SELECT 2, * FROM rd_rows;
COMMIT;
DROP TABLE rd_run_key;

\echo '--- c. run key with FOREIGN KEY (run_key, dataset, as_of): first write, then the rerun'
CREATE TABLE rd_runs (run_key BIGINT PRIMARY KEY, dataset VARCHAR(64) NOT NULL, as_of TIMESTAMP NOT NULL,
                      UNIQUE (dataset, as_of), UNIQUE (run_key, dataset, as_of));
CREATE TABLE rd_run_key_fk (run_key BIGINT NOT NULL, LIKE rd_shape INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE rd_run_key_fk ADD UNIQUE (run_key, series_id, ts);
ALTER TABLE rd_run_key_fk ADD FOREIGN KEY (run_key, dataset, as_of) REFERENCES rd_runs (run_key, dataset, as_of)
    ON DELETE CASCADE;
CREATE INDEX ON rd_run_key_fk (dataset, as_of);
INSERT INTO rd_runs VALUES (1, 'bench', '2024-05-31 23:00');
CHECKPOINT;
INSERT INTO rd_run_key_fk SELECT 1, * FROM rd_rows;
CHECKPOINT;
BEGIN;
DELETE FROM rd_runs WHERE dataset = 'bench' AND as_of = '2024-05-31 23:00';  -- cascades to the rows
INSERT INTO rd_runs VALUES (2, 'bench', '2024-05-31 23:00');
INSERT INTO rd_run_key_fk SELECT 2, * FROM rd_rows;
COMMIT;
DROP TABLE rd_run_key_fk, rd_runs;

\echo '--- d. natural key, table fillfactor 50: first write, then the rerun as INSERT ... ON CONFLICT DO UPDATE'
CREATE TABLE rd_hot (LIKE rd_shape INCLUDING DEFAULTS INCLUDING CONSTRAINTS) WITH (fillfactor = 50);
ALTER TABLE rd_hot ADD UNIQUE (dataset, series_id, as_of, ts);
CREATE INDEX ON rd_hot (dataset, as_of);
CHECKPOINT;
INSERT INTO rd_hot SELECT * FROM rd_rows;
CHECKPOINT;
BEGIN;
INSERT INTO rd_hot SELECT * FROM rd_rows ON CONFLICT (dataset, series_id, as_of, ts) DO UPDATE SET
    step = excluded.step, value = excluded.value, lower = excluded.lower, upper = excluded.upper,
    model = excluded.model, model_version = excluded.model_version, mlflow_run_id = excluded.mlflow_run_id,
    created_at = excluded.created_at;
COMMIT;
SELECT n_tup_upd AS updated, n_tup_hot_upd AS hot, pg_size_pretty(pg_relation_size('rd_hot')) AS table_size
FROM pg_stat_user_tables WHERE relname = 'rd_hot';
DROP TABLE rd_hot;

\echo '--- e. natural key, its unique index at fillfactor 50: first write, then the rerun (DELETE, INSERT)'
CREATE TABLE rd_index_room (LIKE rd_shape INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE rd_index_room ADD UNIQUE (dataset, series_id, as_of, ts) WITH (fillfactor = 50);
CREATE INDEX ON rd_index_room (dataset, as_of);
CHECKPOINT;
INSERT INTO rd_index_room SELECT * FROM rd_rows;
CHECKPOINT;
BEGIN;
DELETE FROM rd_index_room WHERE dataset = 'bench' AND as_of = '2024-05-31 23:00';
INSERT INTO rd_index_room SELECT * FROM rd_rows;
COMMIT;
DROP TABLE rd_index_room, rd_rows, rd_shape;
