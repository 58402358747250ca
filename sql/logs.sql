-- Application logs as evidence (`--logs`, `[logs]`; docs/reference.md,
-- "Application logs").
--
-- `logs` holds every line of the log files: event_id, log_time, level,
-- message, error (the fields the job maps; a line that names no event has
-- a NULL event_id). `log_error_levels` holds the levels that mean a failed
-- attempt, upper case (default ERROR and FATAL); a line's level is
-- compared upper-cased (Unicode, as the run's count does:
-- source/logs.rs, is_error_level). Without logs both are there, `logs` empty.

-- log_attempts: per event named by an error-level line, how many such
-- lines there are (each one failed attempt) and the first and last. The
-- candidates view reads error_lines: the retries the logs show are
-- error_lines - 1 (the first failure was the first try, not a retry).
CREATE OR REPLACE VIEW log_attempts AS
SELECT event_id,
       count(*) AS error_lines,
       min(log_time) AS first_error_at,
       max(log_time) AS last_error_at
FROM logs
WHERE event_id IS NOT NULL
  AND upper(level) IN (SELECT level FROM log_error_levels)
GROUP BY event_id;

-- contradicted: resolved events with an error-level line later than their
-- processed row: the latest event_time among the event's done rows
-- (processed_at; that row's key and seq, the smallest on a tie). One row
-- per event: the first such line (error_at, level, message, error; ties by
-- level, message, error) and how many there are (log_lines). An event
-- whose done rows have no event_time is never contradicted.
--
-- Times compare in microseconds, the logs' unit: an archive in
-- nanoseconds cannot hold a log time past 2262 (and a line's time has no
-- finer part to compare).
--
-- The archive side is narrow and joined to the events the logs name
-- before it is grouped, so only those events' done rows are held; only
-- events with an error line after their latest done row meet the lines
-- again.
CREATE OR REPLACE VIEW contradicted AS
WITH processed AS (
    SELECT e.event_id,
           max(e.event_time) AS processed_at,
           first_value(e.key ORDER BY e.event_time DESC NULLS LAST, e.key, e.seq) AS key,
           first_value(e.seq ORDER BY e.event_time DESC NULLS LAST, e.key, e.seq) AS seq
    FROM log_attempts a
    JOIN events e ON e.event_id = a.event_id
    WHERE e.backfill_done
    GROUP BY e.event_id
    -- No error line after the latest done row: not contradicted, and no
    -- need to look at its lines again.
    HAVING arrow_cast(max(e.event_time), 'Timestamp(µs, "UTC")') < max(a.last_error_at)
),
later AS (
    SELECT p.event_id, p.key, p.seq, p.processed_at,
           l.log_time AS error_at, l.level, l.message, l.error,
           count(*) OVER (PARTITION BY p.event_id) AS log_lines,
           row_number() OVER (
               PARTITION BY p.event_id
               ORDER BY l.log_time, l.level, l.message NULLS LAST, l.error NULLS LAST
           ) AS line_rank
    FROM processed p
    JOIN logs l ON l.event_id = p.event_id
                AND l.log_time > arrow_cast(p.processed_at, 'Timestamp(µs, "UTC")')
    WHERE upper(l.level) IN (SELECT level FROM log_error_levels)
)
SELECT event_id, key, seq, processed_at, error_at, level, message, error, log_lines
FROM later
WHERE line_rank = 1;
