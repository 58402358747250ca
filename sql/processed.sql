-- processed: one row per processed event, its first processed row (the
-- earliest event_time, then the lowest seq and status for exact ties).
-- A duplicate delivery the archive holds twice is one event to an
-- idempotent consumer, so a state folded over the processed events, a
-- total inferred from them or a downstream reconciled with them counts it
-- once (`state-at` folds, `infer`, `reconcile`).
CREATE OR REPLACE VIEW processed AS
SELECT * EXCLUDE (__bf_first)
FROM (
    SELECT *,
           row_number() OVER (
               PARTITION BY event_id
               ORDER BY event_time NULLS LAST, seq NULLS LAST, status
           ) AS __bf_first
    FROM events
    WHERE backfill_done
)
WHERE __bf_first = 1;
