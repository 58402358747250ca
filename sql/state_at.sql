-- state_at: per key, the latest processed event at or before $1 (the
-- whole row, under the input contract's names). `backfill state-at` and
-- the `state_at('T')` table function of `backfill sql` run this query over
-- `events`; $1 is T in event_time's own unit and time zone.
--
-- "Latest" is the highest event_time, then the highest seq, then the
-- highest event_id (a deterministic pick among exact ties). Unprocessed
-- rows (backfill_done false) never count: state is what the processed
-- events imply; rows without a key are no key's state. A `key = 'K'` filter on the result is pushed below the
-- window (it partitions by key) into the Parquet scan.
SELECT * EXCLUDE (backfill_done, backfill_missing_event_id, __bf_rank)
FROM (
    SELECT *,
           row_number() OVER (
               PARTITION BY key
               ORDER BY event_time DESC NULLS LAST, seq DESC NULLS LAST, event_id DESC
           ) AS __bf_rank
    FROM events
    WHERE backfill_done AND event_time <= $1 AND key IS NOT NULL
)
WHERE __bf_rank = 1
