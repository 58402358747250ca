-- conflicts: (key, seq) pairs carried by more than one distinct event_id in
-- the window. min < max is the same test as count(DISTINCT) > 1 and needs no
-- per-group set, which matters over a whole archive. Rows the archive has
-- no event_id for (backfill_missing_event_id, a synthetic id in event_id)
-- claim no seq: they are dead-lettered on their own and must not send a
-- real event to the DLQ with them.
CREATE OR REPLACE VIEW conflicts AS
SELECT key,
       seq,
       min(event_id) AS first_event_id,
       max(event_id) AS last_event_id,
       count(*) AS rows
FROM events
WHERE key IS NOT NULL AND seq IS NOT NULL AND event_id IS NOT NULL
  AND NOT backfill_missing_event_id
GROUP BY key, seq
HAVING min(event_id) < max(event_id);
