-- unprocessed: one row per unresolved event in the window.
--
-- An event is resolved when any of its rows has a done status
-- (events.backfill_done). For the rest, the chosen row is the one with the
-- highest attempts (NULL as 0), the latest event_time on a tie; that row is
-- what a replay or dead letter carries. archived_attempts is the retries the
-- archive shows; archived_rows how many rows the event has. Every row of
-- events has an event_id: one the archive lacks is synthetic
-- (backfill_missing_event_id; src/source/mod.rs), so that row is decided
-- (dead-lettered) instead of vanishing from the balance.
--
-- One narrow aggregate finds, per event, the attempts and event_time of the
-- chosen row (first_value with an ORDER BY needs no sort in DataFusion); one
-- join fetches that row's wide columns (payloads) for the candidates only;
-- the row_number that breaks exact ties runs over candidates, never over the
-- archive.
CREATE OR REPLACE VIEW unprocessed AS
WITH rollup AS (
    SELECT event_id,
           max(coalesce(attempts, 0)) AS archived_attempts,
           first_value(event_time ORDER BY coalesce(attempts, 0) DESC, event_time DESC NULLS LAST)
               AS chosen_time,
           count(*) AS archived_rows
    FROM events
    GROUP BY event_id
    HAVING NOT bool_or(backfill_done)
),
ranked AS (
    SELECT e.*, r.archived_attempts, r.archived_rows,
           row_number() OVER (PARTITION BY e.event_id ORDER BY e.status, e.error) AS chosen_rank
    FROM events e
    JOIN rollup r
      ON e.event_id = r.event_id
     AND coalesce(e.attempts, 0) = r.archived_attempts
     AND e.event_time IS NOT DISTINCT FROM r.chosen_time
)
SELECT * EXCLUDE (chosen_rank) FROM ranked WHERE chosen_rank = 1;
