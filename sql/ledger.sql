-- ledger: per event, what earlier committed runs did (ledger_entries holds
-- the rows of the ledger files named by committed manifests only).
CREATE OR REPLACE VIEW ledger AS
SELECT event_id,
       sum(CASE WHEN outcome = 'replay' THEN 1 ELSE 0 END) AS replays,
       bool_or(outcome = 'dlq') AS dead_lettered,
       max(run_id) AS last_run_id
FROM ledger_entries
GROUP BY event_id;
