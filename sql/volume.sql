-- volume: per group and time bucket, the count of archived rows compared
-- with a robust baseline learned from the same archive: the counts of the
-- same bucket of the week (or, with less than 4 weeks of buckets, of the
-- day) in the preceding weeks (days). docs/sql.md "volume" states the
-- model; `flagged` marks the anomalies.
--
-- The group is `key` here; the binary substitutes the job's grouping
-- columns (`[detect.volume] by`, `anomalies --by`) for every
-- `key /*by*/,` (an empty list counts the whole stream). Settings come from
-- `volume_settings`, a one-row table the binary registers:
--   volume_bucket_us     BIGINT     the bucket width (divides a day)
--   volume_threshold     DOUBLE     |score| above which a bucket is flagged
--   volume_window_start  TIMESTAMP  `--from`, or NULL: the first event
--   volume_window_end    TIMESTAMP  `--to`, or NULL: the last event
--
-- Times are microseconds whatever the archive's unit (a bucket is in µs).
--
-- Two views: `volume_counts` is the one pass over the archive (the rows
-- per group and bucket); `volume` reads it several times (the grid, each
-- bucket's references), so the binary materializes it first.
CREATE OR REPLACE VIEW volume_counts AS
SELECT key /*by*/, idx, count(*) AS observed, min(t) AS first_us, max(t) AS last_us
FROM (
    -- floor(t / b), exact for times before 1970 too (t / b truncates
    -- toward zero, which would put the last bucket before 1970 into 1970)
    SELECT key /*by*/, t, (t - ((t % b) + b) % b) / b AS idx
    FROM (
        SELECT key /*by*/,
               CAST(arrow_cast(event_time, 'Timestamp(µs, "UTC")') AS BIGINT) AS t,
               (SELECT volume_bucket_us FROM volume_settings) AS b
        FROM events
        WHERE event_time IS NOT NULL
    ) micros
) timed
GROUP BY key /*by*/, idx;

CREATE OR REPLACE VIEW volume AS
WITH settings AS (
    SELECT volume_bucket_us AS b,
           volume_threshold AS threshold,
           volume_window_start,
           volume_window_end
    FROM volume_settings
),
-- The buckets, numbered from the epoch: bucket i is [i*b, (i+1)*b). Only
-- the buckets the window covers whole are counted: from `--from` (else
-- the first event) to `--to` (exclusive; else just after the last event).
-- A bucket the window cuts holds part of its events only (the last hour
-- of a live archive, still filling), and would read as a drop.
span AS (
    SELECT -((-w.start_us - ((-w.start_us % s.b) + s.b) % s.b) / s.b) AS first_idx,
           (w.end_us - ((w.end_us % s.b) + s.b) % s.b) / s.b - 1 AS last_idx
    FROM settings s
    CROSS JOIN (
        SELECT coalesce(CAST(v.volume_window_start AS BIGINT), c.first_us) AS start_us,
               coalesce(CAST(v.volume_window_end AS BIGINT), c.last_us + 1) AS end_us
        FROM volume_settings v
        CROSS JOIN (SELECT min(first_us) AS first_us, max(last_us) AS last_us
                    FROM volume_counts) c
    ) w
),
-- Weekly references when the buckets cover 4 weeks, else daily ones.
season AS (
    SELECT first_idx, last_idx, b,
           CASE WHEN (last_idx - first_idx + 1) * b >= 28 * 86400000000
                THEN 7 * 86400000000 / b ELSE 86400000000 / b END AS period,
           CASE WHEN (last_idx - first_idx + 1) * b >= 28 * 86400000000
                THEN 4 ELSE 7 END AS max_refs
    FROM span CROSS JOIN settings
),
buckets AS (
    SELECT unnest(generate_series(first_idx, last_idx)) AS idx FROM season
),
-- Every group (with a timed event) in every bucket: a bucket without rows
-- counts 0, so that a full stop shows.
grid AS (
    SELECT key /*by*/, idx, sum(n) AS observed
    FROM (
        SELECT key /*by*/, idx, observed AS n
        FROM volume_counts
        UNION ALL
        SELECT key /*by*/, idx, 0 AS n
        FROM (SELECT DISTINCT key /*by*/, 1 AS one FROM volume_counts) g CROSS JOIN buckets
    ) rows_and_zeros
    WHERE idx BETWEEN (SELECT first_idx FROM season) AND (SELECT last_idx FROM season)
    GROUP BY key /*by*/, idx
),
phased AS (
    SELECT grid.*, idx % (SELECT period FROM season) AS phase FROM grid
),
-- Each bucket with its references: the same phase, 1..max_refs periods
-- before it, inside the buckets.
pairs AS (
    SELECT key /*by*/, p.idx, p.observed, r.ref_observed
    FROM phased p
    JOIN (SELECT key /*by*/, phase, idx AS ref_idx, observed AS ref_observed FROM phased) r
      USING (key /*by*/, phase)
    CROSS JOIN season s
    WHERE r.ref_idx < p.idx AND r.ref_idx >= p.idx - s.max_refs * s.period
),
baseline AS (
    SELECT key /*by*/, idx, observed,
           count(*) AS refs,
           median(CAST(ref_observed AS DOUBLE)) AS expected
    FROM pairs
    GROUP BY key /*by*/, idx, observed
),
spread AS (
    SELECT key /*by*/, idx, observed, refs, expected,
           median(abs(CAST(ref_observed AS DOUBLE) - expected)) AS mad
    FROM pairs JOIN baseline USING (key /*by*/, idx, observed)
    GROUP BY key /*by*/, idx, observed, refs, expected
),
-- The scale: 1.4826 x MAD, never below sqrt(max(expected, 1)) (the noise
-- of a count of `expected`), so identical references cannot make a
-- difference of one event an anomaly.
scored AS (
    SELECT *,
           (observed - expected)
             / greatest(1.4826 * mad, sqrt(greatest(expected, 1.0))) AS score
    FROM spread
    WHERE refs >= 3
)
SELECT key /*by*/,
       arrow_cast(to_timestamp_micros(idx * (SELECT b FROM settings)), 'Timestamp(µs, "UTC")')
           AS bucket_start,
       arrow_cast(to_timestamp_micros((idx + 1) * (SELECT b FROM settings)), 'Timestamp(µs, "UTC")')
           AS bucket_end,
       observed,
       expected,
       mad,
       refs AS reference_buckets,
       score,
       CASE WHEN observed < expected THEN 'drop' ELSE 'spike' END AS direction,
       abs(score) > (SELECT threshold FROM settings) AS flagged
FROM scored;
