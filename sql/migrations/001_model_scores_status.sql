-- model_scores names the series that validation dropped (issue #5): status and detail columns.
-- For databases created before these columns were part of schema.sql.
ALTER TABLE model_scores ADD COLUMN status VARCHAR(16) NOT NULL DEFAULT 'scored';
ALTER TABLE model_scores ADD COLUMN detail VARCHAR(1000);
