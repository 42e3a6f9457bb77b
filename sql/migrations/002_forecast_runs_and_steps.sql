-- The forecasts table becomes the view `forecasts` over forecast_runs and forecast_steps (see
-- schema.sql for why). schema.sql has created the two empty tables by now; this moves the
-- stored forecasts into them, one run per (dataset, as_of), and the table makes way for the
-- view that views.sql creates with its columns: analysts' queries read what they read before.
--
-- A (dataset, as_of) whose rows name more than one model, version or MLflow run (this pipeline
-- never wrote one: each write had one model) would make two runs of one (dataset, as_of):
-- forecast_runs' UNIQUE (dataset, as_of) refuses it, and init-db stops, changing nothing.
-- Delete the rows of the wrong model from that as_of, then run init-db again.
INSERT INTO forecast_runs (run_key, dataset, as_of, model, model_version, mlflow_run_id, created_at)
SELECT ROW_NUMBER() OVER (ORDER BY dataset, as_of), dataset, as_of, model, model_version, mlflow_run_id,
       MAX(created_at)
FROM forecasts
GROUP BY dataset, as_of, model, model_version, mlflow_run_id;

INSERT INTO forecast_steps (run_key, series_id, ts, step, value, lower, upper)
SELECT r.run_key, f.series_id, f.ts, f.step, f.value, f.lower, f.upper
FROM forecasts f
JOIN forecast_runs r ON r.dataset = f.dataset AND r.as_of = f.as_of;

-- SQLite binds a view to names when it is read: once the table is gone, every view on
-- `forecasts`, ours and any other, reads the view of that name.
-- only on sqlite
DROP TABLE forecasts;

-- PostgreSQL binds a view to the table itself, and refuses to drop a table under one. The table
-- steps aside; views.sql then creates `forecasts` and replaces our views in place over it
-- (keeping their grants, and the views built on them); then, below, the table goes.
-- only on postgresql
ALTER TABLE forecasts RENAME TO forecasts_before_002;

-- The roles that held a privilege on the table hold it on the two tables now (and SELECT on
-- the view), grant option included: a writer role other than the one running init-db keeps
-- writing. A privilege on some columns (GRANT SELECT (series_id, value) ...) is held on those
-- columns of the table that holds each now, SELECT on those of the view too. And the table's
-- owner owns them (a superuser running init-db would have owned them, leaving the owner, and
-- our views it owns, without access).
-- only on postgresql
-- after the views
DO $$
DECLARE
    g record;
    old_owner name;
    holder text;
BEGIN
    SELECT pg_get_userbyid(relowner) INTO old_owner FROM pg_class WHERE oid = 'forecasts_before_002'::regclass;
    IF old_owner <> current_user THEN
        EXECUTE 'ALTER TABLE forecast_runs OWNER TO ' || quote_ident(old_owner);
        EXECUTE 'ALTER TABLE forecast_steps OWNER TO ' || quote_ident(old_owner);
        EXECUTE 'ALTER VIEW forecasts OWNER TO ' || quote_ident(old_owner);
    END IF;
    FOR g IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS role,
               a.privilege_type,
               CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS option
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'forecasts_before_002'::regclass AND a.grantee <> c.relowner
    LOOP
        -- concatenated, not format(): the driver would take its placeholders for parameters
        EXECUTE 'GRANT ' || g.privilege_type || ' ON forecast_runs, forecast_steps TO ' || g.role || g.option;
        IF g.privilege_type = 'SELECT' THEN
            EXECUTE 'GRANT SELECT ON forecasts TO ' || g.role || g.option;
        END IF;
    END LOOP;
    FOR g IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS role,
               a.privilege_type, att.attname::text AS name,
               CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS option
        FROM pg_class c
        JOIN pg_attribute att ON att.attrelid = c.oid AND att.attnum > 0 AND NOT att.attisdropped,
             aclexplode(att.attacl) a
        WHERE c.oid = 'forecasts_before_002'::regclass AND a.grantee <> c.relowner
    LOOP
        holder := CASE WHEN g.name IN ('dataset', 'as_of', 'model', 'model_version', 'mlflow_run_id', 'created_at')
                       THEN 'forecast_runs'
                       WHEN g.name IN ('series_id', 'ts', 'step', 'value', 'lower', 'upper') THEN 'forecast_steps' END;
        IF holder IS NOT NULL THEN  -- else a column the table had besides ours: its rows did not move either
            EXECUTE 'GRANT ' || g.privilege_type || ' (' || quote_ident(g.name) || ') ON ' || holder
                    || ' TO ' || g.role || g.option;
            IF g.privilege_type = 'SELECT' THEN
                EXECUTE 'GRANT SELECT (' || quote_ident(g.name) || ') ON forecasts TO ' || g.role || g.option;
            END IF;
        END IF;
    END LOOP;
END
$$;

-- A view of yours that reads the table itself (not through one of ours) still depends on it,
-- now named forecasts_before_002: PostgreSQL refuses, and init-db stops, naming it, and
-- changes nothing. Drop it, run init-db,
-- and create it again (it will read the view `forecasts`).
-- only on postgresql
-- after the views
DROP TABLE forecasts_before_002;
