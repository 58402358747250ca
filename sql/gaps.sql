-- gaps: per key, over the distinct seq values in the window, each run of
-- missing integers between two observed values, with the observed events on
-- either side (where several events share a seq: the smallest event_id, and
-- its earliest event_time). Missing events cannot be replayed from the
-- archive; this is the report a team takes upstream.
CREATE OR REPLACE VIEW gaps AS
WITH per_seq AS (
    SELECT key,
           seq,
           min(event_id) AS event_id,
           first_value(event_time ORDER BY event_id, event_time) AS event_time
    FROM events
    WHERE key IS NOT NULL AND seq IS NOT NULL
    GROUP BY key, seq
),
neighbours AS (
    SELECT key, seq, event_id, event_time,
           lag(seq) OVER (PARTITION BY key ORDER BY seq) AS prev_seq,
           lag(event_id) OVER (PARTITION BY key ORDER BY seq) AS prev_event_id,
           lag(event_time) OVER (PARTITION BY key ORDER BY seq) AS prev_event_time
    FROM per_seq
)
SELECT key,
       prev_seq + 1 AS first_missing_seq,
       seq - 1 AS last_missing_seq,
       -- (seq - 1) - prev_seq cannot overflow unless the run spans more
       -- than i64::MAX values; then the count saturates at i64::MAX.
       CASE WHEN prev_seq < 0 AND seq - 1 > prev_seq + 9223372036854775807
            THEN 9223372036854775807
            ELSE (seq - 1) - prev_seq END AS missing_count,
       prev_event_id AS before_event_id,
       prev_event_time AS before_event_time,
       event_id AS after_event_id,
       event_time AS after_event_time
FROM neighbours
WHERE seq > prev_seq + 1;
