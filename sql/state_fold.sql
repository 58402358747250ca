-- state_fold: per key, the job's `[state_at] columns` aggregates over the
-- processed events at or before $1. `/*columns*/` is replaced by the
-- job's `expr AS "name"` list (each checked to be an aggregate first);
-- `last_event_time` says which event the state is as of.
SELECT key, /*columns*/, max(event_time) AS last_event_time
FROM events
WHERE backfill_done AND event_time <= $1
GROUP BY key
