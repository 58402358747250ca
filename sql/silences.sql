-- silences: per group, each interval of the window in which no event
-- arrived for longer than the threshold, with the events on either side.
--
-- The group is `key` here; the binary substitutes the job's grouping
-- columns (`[detect.silence] by`, `silences --by`) for every `key /*by*/`.
-- The threshold and the window's end come from `silence_settings`, a
-- one-row table the binary registers:
--   silence_threshold_us  BIGINT  a fixed threshold (`threshold = "15m"`), or NULL
--   silence_median_factor DOUBLE  a relative one (`"5x median"`: 5.0), or NULL
--   silence_window_end    TIMESTAMP  the window's end: `--to`, else the
--                         archive's last event time (in the window), which
--                         the footers' statistics answer for a whole archive
--
-- Times are microseconds whatever the archive's unit (the threshold and
-- the window's end are).
--
-- An event arrives once: several archived rows of one event_id (retries)
-- count at its earliest event_time, and rows without an event_id of their
-- own are left out. The group's cadence is the median of the intervals
-- between its consecutive arrivals; a group whose last arrival is followed
-- by nothing gets a last interval to the window's end, so a producer that
-- stopped shows up, with no event after it. The relative threshold needs a cadence: a group with a
-- single arrival, or a median of 0 (bursts of equal times), gets none.
CREATE OR REPLACE VIEW silences AS
WITH arrivals AS (
    SELECT key /*by*/, event_id, arrow_cast(min(event_time), 'Timestamp(µs, "UTC")') AS event_time
    FROM events
    WHERE event_time IS NOT NULL AND NOT backfill_missing_event_id
    GROUP BY key /*by*/, event_id
),
intervals AS (
    SELECT key /*by*/,
           event_id AS before_event_id,
           event_time AS silent_from,
           lead(event_id) OVER w AS after_event_id,
           lead(event_time) OVER w AS next_time
    FROM arrivals
    WINDOW w AS (PARTITION BY key /*by*/ ORDER BY event_time, event_id)
),
-- The settings as scalar subqueries, not a join: a join with the one-row
-- table would gather every interval into one partition.
bounded AS (
    SELECT i.*,
           coalesce(i.next_time, (SELECT silence_window_end FROM silence_settings)) AS silent_to,
           (SELECT silence_threshold_us FROM silence_settings) AS silence_threshold_us,
           (SELECT silence_median_factor FROM silence_settings) AS silence_median_factor
    FROM intervals i
),
measured AS (
    SELECT *,
           CAST(silent_to AS BIGINT) - CAST(silent_from AS BIGINT) AS silent_us,
           -- the cadence: consecutive arrivals only, not the tail
           median(CASE WHEN next_time IS NOT NULL
                       THEN CAST(next_time AS BIGINT) - CAST(silent_from AS BIGINT) END)
               OVER (PARTITION BY key /*by*/) AS median_us
    FROM bounded
)
SELECT key /*by*/,
       silent_from,
       silent_to,
       CAST(silent_us AS DOUBLE) / 1000000.0 AS duration_seconds,
       before_event_id,
       after_event_id,
       median_us / 1000000.0 AS median_interval_seconds,
       CASE WHEN median_us > 0 THEN silent_us / median_us END AS expected_events
FROM measured
WHERE silent_us > coalesce(CAST(silence_threshold_us AS DOUBLE),
                           CASE WHEN median_us > 0 THEN silence_median_factor * median_us END);
