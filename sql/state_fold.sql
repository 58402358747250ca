-- state_fold: per key, the job's `[state_at] columns` aggregates over the
-- processed events at or before $1, each event once (`processed`: its
-- first processed row). Rows without a key are no key's state.
-- `/*columns*/` is replaced by the job's `expr AS "name"` list (each checked to be an aggregate first);
-- `last_event_time` says which event the state is as of.
SELECT key, /*columns*/, max(event_time) AS last_event_time
FROM processed
WHERE event_time <= $1 AND key IS NOT NULL
GROUP BY key
