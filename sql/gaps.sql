-- gaps: per key, over the distinct seq values in the window, each run of
-- missing integers between two observed values, with the observed events on
-- either side (where several events share a seq: the smallest event_id, and
-- its earliest event_time; rows without an event_id of their own count as
-- observed seqs but never name a neighbour). Missing events cannot be replayed from the
-- archive; this is the report a team takes upstream.
--
-- The per-seq aggregate uses plain min() only; the few seqs carried by
-- several events (the conflicts view) get the smallest event_id's own time
-- from a join over just those. An ordered first_value per (key, seq) would
-- do the same in one step at several times the cost.
CREATE OR REPLACE VIEW gaps AS
WITH per_seq_raw AS (
    SELECT key, seq,
           min(event_id) FILTER (WHERE NOT backfill_missing_event_id) AS event_id,
           min(event_time) FILTER (WHERE NOT backfill_missing_event_id) AS event_time
    FROM events
    WHERE key IS NOT NULL AND seq IS NOT NULL
    GROUP BY key, seq
),
shared AS (
    SELECT e.key, e.seq, min(e.event_time) AS event_time
    FROM events e
    JOIN conflicts c
      ON e.key = c.key AND e.seq = c.seq AND e.event_id = c.first_event_id
    GROUP BY e.key, e.seq
),
per_seq AS (
    SELECT p.key, p.seq, p.event_id,
           CASE WHEN s.key IS NULL THEN p.event_time ELSE s.event_time END AS event_time
    FROM per_seq_raw p
    LEFT JOIN shared s ON p.key = s.key AND p.seq = s.seq
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
