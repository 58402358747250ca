-- reconcile: per key, a snapshot of the downstream store against what the
-- archive says the downstream should hold at the snapshot's time.
--
-- `snapshot` holds (__bf_key, __bf_actual, __bf_as_of): one row per key,
-- the value the downstream holds and when it was read. A key the archive
-- has processed events for but the snapshot lacks is compared at the
-- snapshot's latest as_of.
--
--   expected         the job's aggregate (`sum(amount) /*expected*/`, which
--                    the binary replaces with the job's: count(*),
--                    max(seq), ...) over the key's processed
--                    events at or before as_of, each event once: its
--                    first processed row (a duplicate delivery the archive
--                    holds twice is one event to an idempotent consumer)
--   with_unresolved  the same aggregate with the key's unresolved events at
--                    or before as_of added (their chosen rows, as a replay
--                    would carry them): what the downstream would hold had
--                    they been applied
--   status           agree               |actual - expected| <= tolerance
--                    disagree            otherwise
--                    missing_downstream  processed events, no snapshot row
--                    missing_archive     a snapshot row, no processed event
--                                        of the key up to as_of
--   explained        the status is not agree, and with_unresolved matches
--                    actual (within the tolerance): the downstream already
--                    reflects the unresolved events (what was lost is their
--                    status, not their effect), so replaying them would
--                    apply them twice
--
-- Events without an event_time (or one after as_of) count on neither side.
-- `0 /*tolerance*/` is replaced by the job's tolerance (a non-negative
-- number).
--
-- Four views, each planned over the one before: `src/reconcile.rs`
-- materializes `reconcile_facts` (the narrow columns of one row per
-- event, computed from `reconcile_rows` in one sort by event id, the
-- same rule in Rust: DataFusion's windows cost microseconds per
-- partition, and here every event is one) and `reconcile_scope`, so that
-- the archive is read and sorted once.
--
-- reconcile_rows: every archived row with a key at or before its key's
-- as_of (the snapshot's; for a key the snapshot lacks, the horizon: the
-- snapshot's latest as_of, a scalar subquery, not a join, which would
-- gather the events into one partition). A row written after as_of (a
-- retry, a later processing, the event under another key) is not what
-- stood at as_of and plays no part.
CREATE OR REPLACE VIEW reconcile_rows AS
SELECT * FROM (
    SELECT e.*,
           coalesce(s.__bf_as_of, (SELECT max(__bf_as_of) FROM snapshot)) AS __bf_as_of,
           s.__bf_key IS NOT NULL AS __bf_in_snapshot
    FROM events e LEFT JOIN snapshot s ON e.key = s.__bf_key
    WHERE e.key IS NOT NULL
)
WHERE event_time <= __bf_as_of;

-- reconcile_facts: one row per event as it stood at its key's as_of. An
-- event is processed at as_of when its first processed row is at or
-- before it (`__bf_done`; a duplicate delivery is one event), unresolved
-- when its first row is at or before it and it was not processed by then
-- (an event processed later was unresolved at as_of), and not yet seen
-- otherwise (left out). The row kept, among the rows up to as_of, is a
-- processed event's first processed row, else the chosen row (the
-- highest attempts, the latest event_time, as `unprocessed` chooses): the
-- first in the order
--   backfill_done DESC, CASE WHEN backfill_done THEN event_time END,
--   coalesce(attempts, 0) DESC, event_time DESC NULLS LAST,
--   seq NULLS LAST, status, error
-- (`src/reconcile.rs` sorts by it). Here the window runs in that order
-- reversed, so that the kept row comes last, where the running minimums
-- are the event's: a window that streams through the sort, where an
-- unordered `min(...) OVER (PARTITION BY event_id)` would hold every row
-- of a partition in memory at once.
CREATE OR REPLACE VIEW reconcile_facts AS
SELECT * EXCLUDE (__bf_last, __bf_seen_at, __bf_done_at),
       coalesce(__bf_done_at <= __bf_as_of, false) AS __bf_done
FROM (
    SELECT e.*,
           min(e.event_time) OVER w AS __bf_seen_at,
           min(CASE WHEN e.backfill_done THEN e.event_time END) OVER w AS __bf_done_at,
           lead(1) OVER w IS NULL AS __bf_last
    FROM reconcile_rows e
    WINDOW w AS (
        PARTITION BY e.event_id
        ORDER BY e.backfill_done ASC NULLS LAST,
                 CASE WHEN e.backfill_done THEN e.event_time END DESC NULLS FIRST,
                 coalesce(e.attempts, 0) ASC NULLS LAST,
                 e.event_time ASC NULLS FIRST,
                 e.seq DESC NULLS FIRST,
                 e.status DESC NULLS FIRST,
                 e.error DESC NULLS FIRST
        ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
    )
)
WHERE __bf_last AND __bf_seen_at <= __bf_as_of;

-- reconcile_scope: every key compared, with its as_of: the snapshot's
-- keys, and the keys it lacks that have a processed event by the horizon.
CREATE OR REPLACE VIEW reconcile_scope AS
SELECT __bf_key, __bf_as_of, true AS __bf_in_snapshot FROM snapshot
UNION ALL
SELECT DISTINCT key AS __bf_key, __bf_as_of, false AS __bf_in_snapshot
FROM reconcile_facts
WHERE __bf_done AND NOT __bf_in_snapshot;

-- reconcile: per key, the judgement.
CREATE OR REPLACE VIEW reconcile AS
WITH expected AS (
    SELECT key AS __bf_k, sum(amount) /*expected*/ AS __bf_expected, count(*) AS __bf_processed
    FROM reconcile_facts
    WHERE __bf_done
    GROUP BY key
),
unresolved AS (
    SELECT key AS __bf_k, count(*) AS __bf_unresolved,
           array_to_string(
               array_slice(array_agg(event_id ORDER BY seq NULLS LAST, event_id), 1, 20), ' '
           ) AS __bf_ids
    FROM reconcile_facts
    WHERE NOT __bf_done
    GROUP BY key
),
with_open AS (
    SELECT key AS __bf_k, sum(amount) /*expected*/ AS __bf_with_unresolved
    FROM reconcile_facts
    GROUP BY key
),
joined AS (
    SELECT s.__bf_key AS key,
           s.__bf_as_of AS as_of,
           s.__bf_in_snapshot,
           sn.__bf_actual AS actual,
           x.__bf_expected AS expected,
           coalesce(x.__bf_processed, 0) AS processed_events,
           coalesce(u.__bf_unresolved, 0) AS unresolved_events,
           u.__bf_ids AS unresolved_event_ids,
           w.__bf_with_unresolved AS with_unresolved
    FROM reconcile_scope s
    LEFT JOIN snapshot sn ON s.__bf_in_snapshot AND s.__bf_key = sn.__bf_key
    LEFT JOIN expected x ON s.__bf_key = x.__bf_k
    LEFT JOIN unresolved u ON s.__bf_key = u.__bf_k
    LEFT JOIN with_open w ON s.__bf_key = w.__bf_k
),
judged AS (
    SELECT *,
           CASE WHEN NOT __bf_in_snapshot THEN 'missing_downstream'
                WHEN processed_events = 0 THEN 'missing_archive'
                WHEN abs(actual - expected) <= 0 /*tolerance*/ THEN 'agree'
                ELSE 'disagree' END AS status
    FROM joined
)
SELECT key, as_of, status, actual, expected, actual - expected AS difference,
       processed_events, unresolved_events, unresolved_event_ids, with_unresolved,
       coalesce(status <> 'agree' AND __bf_in_snapshot AND unresolved_events > 0
                AND abs(actual - with_unresolved) <= 0 /*tolerance*/, false) AS explained
FROM judged;
