"""A checksum of a run's output folder that ignores the columns a run
stamps (run id, detection time) and the file layout: two runs that decided
the same thing print the same line. Used by scripts/bench.sh and
scripts/bench-cluster.sh."""
import sys

import duckdb

d = sys.argv[1]
con = duckdb.connect()
for kind, cols in [("replay", "event_id, backfill_reason, backfill_attempt, payload"),
                   ("dlq", "event_id, backfill_reason, backfill_attempt, payload"),
                   ("gaps", "key, first_missing_seq, last_missing_seq, before_event_id, after_event_id")]:
    n, h = con.execute(f"SELECT count(*), bit_xor(hash({cols})) FROM read_parquet('{d}/{kind}/**/*.parquet')").fetchone()
    print(f"{kind}={n}:{h}", end=" ")
print()
