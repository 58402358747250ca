"""The same detection as `backfill run`, in DuckDB, on the same files.

Used by scripts/bench.sh to put backfill's wall time and memory next to
DuckDB's. It computes what a run computes (counts, unprocessed chosen rows,
conflicts, gaps) and writes replay/DLQ/gap Parquet files, so neither side
gets away with less work. It has no ledger (the first run of a state has an
empty one), so it matches a first run.

usage: python3 bench/duckdb_backfill.py ARCHIVE_DIR OUT_DIR [MAX_ATTEMPTS]
       python3 bench/duckdb_backfill.py --detect-only ARCHIVE_DIR

--detect-only is the fastest SQL we found for the detection alone: the
counts, the conflicts, the unresolved events' decisions and the gaps, each
counted, with no payload read and nothing written (one GROUP BY event_id, one
GROUP BY key, seq). It is the lower bound a peer gets for the same answer.
"""

import json
import os
import sys
import time

import duckdb


def detect_only(archive: str) -> None:
    t0 = time.time()
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute(
        f"CREATE VIEW events AS SELECT event_id, key, seq, attempts, event_time, status "
        f"FROM read_parquet('{archive}/**/*.parquet', union_by_name=true)"
    )
    rows, events, candidates = con.execute(
        """
        SELECT sum(n), count(*), count(*) FILTER (WHERE NOT done) FROM (
          SELECT event_id, count(*) AS n, bool_or(coalesce(status = 'processed', false)) AS done,
                 max(coalesce(attempts, 0)) AS a
          FROM events GROUP BY event_id)
        """
    ).fetchone()
    conflicts, gaps = con.execute(
        """
        WITH s AS (SELECT key, seq, min(event_id) AS lo, max(event_id) AS hi
                   FROM events WHERE key IS NOT NULL AND seq IS NOT NULL GROUP BY key, seq),
             n AS (SELECT seq, lo, hi, lag(seq) OVER (PARTITION BY key ORDER BY seq) AS prev FROM s)
        SELECT count(*) FILTER (WHERE lo < hi), count(*) FILTER (WHERE seq - prev > 1) FROM n
        """
    ).fetchone()
    print(json.dumps({
        "engine": "duckdb " + duckdb.__version__, "mode": "detect-only",
        "rows": int(rows), "events": events, "candidates": candidates,
        "conflicts": conflicts, "gaps": gaps,
        "elapsed_ms": int((time.time() - t0) * 1000),
    }))


def main() -> None:
    if sys.argv[1] == "--detect-only":
        detect_only(sys.argv[2])
        return
    archive, out = sys.argv[1], sys.argv[2]
    max_attempts = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute(
        f"CREATE VIEW events AS SELECT * FROM read_parquet('{archive}/**/*.parquet', union_by_name=true)"
    )
    rows, events = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    con.execute(
        """
        CREATE TEMP TABLE conflicts AS
        SELECT key, seq FROM events GROUP BY key, seq HAVING min(event_id) < max(event_id)
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE candidates AS
        WITH r AS (
          SELECT event_id, max(coalesce(attempts, 0)) AS archived_attempts
          FROM events GROUP BY event_id
          HAVING NOT bool_or(coalesce(status = 'processed', false))
        ),
        ranked AS (
          SELECT e.*, r.archived_attempts,
                 row_number() OVER (PARTITION BY e.event_id
                   ORDER BY coalesce(e.attempts, 0) DESC, e.event_time DESC, e.status, e.error) AS rn
          FROM events e JOIN r USING (event_id)
        )
        SELECT ranked.* EXCLUDE (rn), c.key IS NOT NULL AS in_conflict
        FROM ranked LEFT JOIN conflicts c ON ranked.key = c.key AND ranked.seq = c.seq
        WHERE rn = 1
        """
    )
    con.execute(
        f"""
        COPY (SELECT * EXCLUDE (in_conflict, archived_attempts), 'unprocessed' AS backfill_reason,
                     archived_attempts + 1 AS backfill_attempt
              FROM candidates WHERE NOT in_conflict AND archived_attempts < {max_attempts}
              ORDER BY key, seq, event_id)
        TO '{out}/replay.parquet' (FORMAT parquet, COMPRESSION zstd)
        """
    )
    con.execute(
        f"""
        COPY (SELECT * EXCLUDE (in_conflict, archived_attempts),
                     CASE WHEN in_conflict THEN 'sequence_conflict' ELSE 'max_attempts_exceeded' END AS backfill_reason,
                     archived_attempts AS backfill_attempt
              FROM candidates WHERE in_conflict OR archived_attempts >= {max_attempts}
              ORDER BY key, seq, event_id)
        TO '{out}/dlq.parquet' (FORMAT parquet, COMPRESSION zstd)
        """
    )
    con.execute(
        f"""
        COPY (
          WITH s AS (SELECT key, seq, min(event_id) AS event_id, arg_min(event_time, event_id) AS event_time
                     FROM events GROUP BY key, seq),
          n AS (SELECT *, lag(seq) OVER w AS prev_seq, lag(event_id) OVER w AS prev_id,
                       lag(event_time) OVER w AS prev_time
                FROM s WINDOW w AS (PARTITION BY key ORDER BY seq))
          SELECT key, prev_seq + 1 AS first_missing_seq, seq - 1 AS last_missing_seq,
                 seq - prev_seq - 1 AS missing_count, prev_id AS before_event_id,
                 prev_time AS before_event_time, event_id AS after_event_id, event_time AS after_event_time
          FROM n WHERE seq - prev_seq > 1 ORDER BY key, first_missing_seq
        ) TO '{out}/gaps.parquet' (FORMAT parquet, COMPRESSION zstd)
        """
    )
    replay = con.execute(f"SELECT count(*) FROM '{out}/replay.parquet'").fetchone()[0]
    dlq = con.execute(f"SELECT count(*) FROM '{out}/dlq.parquet'").fetchone()[0]
    gaps = con.execute(f"SELECT count(*) FROM '{out}/gaps.parquet'").fetchone()[0]
    print(json.dumps({
        "engine": "duckdb " + duckdb.__version__,
        "rows": rows, "events": events, "replayed": replay, "dead_lettered": dlq,
        "gaps": gaps, "elapsed_ms": int((time.time() - t0) * 1000),
    }))


if __name__ == "__main__":
    main()
