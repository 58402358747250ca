-- candidates: what the retry policy decides over. Every unresolved event's
-- chosen row, whether its (key, seq) is a conflict, and what earlier
-- committed runs of the same state did with it (the ledger view:
-- event_id, replays, dead_lettered).
--
-- Application logs (sql/logs.sql): archived_attempts here is the retries
-- the policy sees, greatest(the archive's, the error-level log lines naming
-- the event - 1); an event no error line names keeps the archive's as they
-- are. Greatest, not a sum: a worker that archives its retries and logs its
-- failures is not counted twice.
--
-- The barriers (`run --on-gap`, `--on-conflict`): an event is after a gap
-- when its key has a gap whose first missing seq is below the event's seq
-- (its key's first gap is enough: min over the key), and after a conflict
-- when its key has a conflicting seq below its own. The conflicting
-- (key, seq) itself is not after it. No key or no seq: after nothing.
CREATE OR REPLACE VIEW candidates AS
SELECT u.* REPLACE (greatest(u.archived_attempts, la.error_lines - 1) AS archived_attempts),
       c.key IS NOT NULL AS backfill_in_conflict,
       coalesce(l.replays, 0) AS backfill_ledger_replays,
       coalesce(l.dead_lettered, false) AS backfill_ledger_dead,
       coalesce(u.seq > g.first_missing_seq, false) AS backfill_after_gap,
       coalesce(u.seq > fc.seq, false) AS backfill_after_conflict
FROM unprocessed u
LEFT JOIN conflicts c ON u.key = c.key AND u.seq = c.seq
LEFT JOIN ledger l ON u.event_id = l.event_id
LEFT JOIN log_attempts la ON u.event_id = la.event_id
LEFT JOIN (SELECT key, min(first_missing_seq) AS first_missing_seq FROM gaps GROUP BY key) g
  ON u.key = g.key
LEFT JOIN (SELECT key, min(seq) AS seq FROM conflicts GROUP BY key) fc
  ON u.key = fc.key;
