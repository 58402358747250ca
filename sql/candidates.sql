-- candidates: what the retry policy decides over. Every unresolved event's
-- chosen row, whether its (key, seq) is a conflict, and what earlier
-- committed runs of the same state did with it (the ledger view:
-- event_id, replays, dead_lettered).
CREATE OR REPLACE VIEW candidates AS
SELECT u.*,
       c.key IS NOT NULL AS backfill_in_conflict,
       coalesce(l.replays, 0) AS backfill_ledger_replays,
       coalesce(l.dead_lettered, false) AS backfill_ledger_dead
FROM unprocessed u
LEFT JOIN conflicts c ON u.key = c.key AND u.seq = c.seq
LEFT JOIN ledger l ON u.event_id = l.event_id;
