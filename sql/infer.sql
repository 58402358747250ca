-- infer: per key, what two snapshots of totals say was lost between them.
--
-- `snapshot_before` and `snapshot_after` hold (key, total) at the window's
-- start and end; `events` is the window. The archived processed events'
-- /*amount*/ add up to `archived`, each event once (`processed`: a
-- duplicate delivery is one event); what the snapshots moved beyond that
-- is `missing_amount`. The key's sequence gaps in the window are where the
-- lost events were. "Nothing missing" is |missing_amount| at most the
-- tolerance (`0 /*tolerance*/`, replaced by --tolerance: float amounts
-- seldom add up exactly). The verdict:
--   consistent  nothing missing, no gap
--   inferred    an amount missing and exactly one gap: one compensating
--               event covers that seq range with that amount
--   ambiguous   anything else (an amount but no gap or several gaps, a
--               gap the amounts do not show, or an archived amount that
--               is NULL): the data does not decide
WITH archived AS (
    SELECT key, sum(/*amount*/) AS archived, count(*) AS archived_events,
           count(*) - count(/*amount*/) AS null_amounts
    FROM processed
    WHERE key IS NOT NULL
    GROUP BY key
),
g AS (
    SELECT key, count(*) AS gaps,
           min(first_missing_seq) AS first_missing_seq,
           max(last_missing_seq) AS last_missing_seq,
           sum(missing_count) AS missing_events
    FROM gaps
    GROUP BY key
),
all_keys AS (
    SELECT key FROM snapshot_before
    UNION SELECT key FROM snapshot_after
    UNION SELECT key FROM archived
    UNION SELECT key FROM g
),
joined AS (
    SELECT k.key,
           coalesce(b.total, 0) AS total_before,
           coalesce(a.total, 0) AS total_after,
           coalesce(ar.archived, 0) AS archived,
           coalesce(ar.archived_events, 0) AS archived_events,
           coalesce(ar.null_amounts, 0) AS null_amounts,
           coalesce(a.total, 0) - coalesce(b.total, 0) - coalesce(ar.archived, 0) AS missing_amount,
           coalesce(g.gaps, 0) AS gaps,
           coalesce(g.missing_events, 0) AS missing_events,
           g.first_missing_seq, g.last_missing_seq
    FROM all_keys k
    LEFT JOIN snapshot_before b ON k.key = b.key
    LEFT JOIN snapshot_after a ON k.key = a.key
    LEFT JOIN archived ar ON k.key = ar.key
    LEFT JOIN g ON k.key = g.key
)
SELECT *,
       CASE WHEN null_amounts > 0 THEN 'ambiguous'
            WHEN abs(missing_amount) <= 0 /*tolerance*/ AND gaps = 0 THEN 'consistent'
            WHEN abs(missing_amount) > 0 /*tolerance*/ AND gaps = 1 THEN 'inferred'
            ELSE 'ambiguous' END AS verdict
FROM joined
ORDER BY key
