#!/usr/bin/env bash
# Benchmarks (never timed tests): backfill vs DuckDB on the same generated
# archive in the same run, and the Kafka replay rate vs Python's
# confluent-kafka producer on the same broker. Results go to bench/results/
# and are summarised in BENCHMARKS.md by hand.
#
#   EVENTS=10000000 scripts/bench.sh        # the default
#   SKIP_KAFKA=1 scripts/bench.sh           # the scan/decide part only
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
# Release builds get their own target dir: a debug build running beside
# them (tests) would otherwise hold the lock for the whole build.
export CARGO_TARGET_DIR="${BENCH_TARGET_DIR:-$CACHE/target-release}"
EVENTS="${EVENTS:-10000000}"
KEYS="${KEYS:-10000}"
WORK="${BENCH_DIR:-$CACHE/bench}"
RESULTS=bench/results
mkdir -p "$RESULTS" "$WORK"

python3 -c "import duckdb" 2>/dev/null || pip install --quiet duckdb
cargo build --release --bin backfill
BIN="$CARGO_TARGET_DIR/release/backfill"

ARCHIVE="$WORK/archive-$EVENTS"
if [ ! -d "$ARCHIVE" ]; then
  "$BIN" generate --out "$ARCHIVE" --events "$EVENTS" --keys "$KEYS" --seed 1 --days 7 --files-per-day 4
fi
du -sh "$ARCHIVE"

measure() { # name, command...
  local name="$1"; shift
  /usr/bin/time -f "%e %M" -o "$WORK/$name.time" "$@" > "$WORK/$name.out"
  read -r secs kb < "$WORK/$name.time"
  echo "$name: ${secs}s wall, $((kb / 1024)) MiB peak RSS"
  echo "{\"name\":\"$name\",\"seconds\":$secs,\"peak_rss_mib\":$((kb / 1024))}" >> "$RESULTS/scan.jsonl"
}

: > "$RESULTS/scan.jsonl"
for i in 1 2 3; do
  rm -rf "$WORK/out-backfill" "$WORK/out-duckdb"
  measure "backfill-run-$i" "$BIN" run --source "$ARCHIVE" --out "$WORK/out-backfill" --run-id "bench-$i" --progress off --report "$WORK/report-$i.json"
  measure "duckdb-$i" python3 bench/duckdb_backfill.py "$ARCHIVE" "$WORK/out-duckdb"
done
cat "$WORK/report-1.json" > "$RESULTS/backfill-report.json"
cat "$WORK/duckdb-1.out" > "$RESULTS/duckdb-report.json"
python3 - "$RESULTS/scan.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(prefix, key):
    return statistics.median(r[key] for r in rows if r["name"].startswith(prefix))
b, d = med("backfill", "seconds"), med("duckdb", "seconds")
print(f"median wall: backfill {b:.2f}s, duckdb {d:.2f}s, ratio backfill/duckdb {b/d:.2f}")
print(f"median peak RSS: backfill {med('backfill','peak_rss_mib')} MiB, duckdb {med('duckdb','peak_rss_mib')} MiB")
PY

if [ -z "${SKIP_KAFKA:-}" ] && [ -x scripts/bench-kafka.sh ]; then
  scripts/bench-kafka.sh
fi
