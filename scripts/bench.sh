#!/usr/bin/env bash
# Benchmarks (never timed tests): backfill vs DuckDB on the same generated
# archive in the same run, and the Kafka replay rate vs Python's
# confluent-kafka producer on the same broker. Results go to bench/results/
# and are summarised in BENCHMARKS.md by hand.
#
#   scripts/bench.sh                          # 1M, 10M, 50M events
#   SIZES=10000000 ROUNDS=1 scripts/bench.sh  # one size, one round
#   SKIP_KAFKA=1 scripts/bench.sh             # the scan/decide part only
#   SKIP_CLUSTER=1 scripts/bench.sh           # without the cluster-mode comparison
#   BENCH_BIN=path/to/backfill scripts/bench.sh  # no build, that binary
#
# Per size and round: backfill run (default memory limit), the same run
# with --memory-limit 1G (its outputs must equal the first's), DuckDB's full
# equivalent, DuckDB's detection alone, and a plain scan of the narrow
# columns; the table at the end holds the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
# Release builds get their own target dir: a debug build running beside
# them (tests) would otherwise hold the lock for the whole build.
export CARGO_TARGET_DIR="${BENCH_TARGET_DIR:-$CACHE/target-release}"
SIZES="${SIZES:-${EVENTS:-1000000 10000000 50000000}}"
KEYS="${KEYS:-10000}"
ROUNDS="${ROUNDS:-3}"
# Rounds at 50M and above: each takes minutes.
ROUNDS_LARGE="${ROUNDS_LARGE:-1}"
LIMIT="${BENCH_MEMORY_LIMIT:-1G}"
WORK="${BENCH_DIR:-$CACHE/bench}"
RESULTS=bench/results
mkdir -p "$RESULTS" "$WORK"

python3 -c "import duckdb" 2>/dev/null || pip install --quiet duckdb
# BENCH_BIN: measure a binary already built (e.g. while a newer commit's
# release build would take longer than the measurement).
if [ -n "${BENCH_BIN:-}" ]; then
  BIN="$BENCH_BIN"
else
  cargo build --release --bin backfill
  BIN="$CARGO_TARGET_DIR/release/backfill"
fi

# Both programs peak near 11 GiB at 50M, so each run evicts part of the
# archive from the page cache for the next: every measured command starts
# with the archive read into the cache (WARM=0: leave the cache alone).
warm() {
  [ "${WARM:-1}" = 1 ] && [ -n "${ARCHIVE:-}" ] && find "$ARCHIVE" -name '*.parquet' -exec cat {} + > /dev/null
  return 0
}

measure() { # name, command...
  local name="$1"; shift
  warm
  /usr/bin/time -f "%e %M" -o "$WORK/time.txt" "$@" > "$WORK/$name.out"
  read -r secs kb < "$WORK/time.txt"
  echo "$name: ${secs}s wall, $((kb / 1024)) MiB peak RSS"
  echo "{\"name\":\"$name\",\"events\":$EVENTS,\"seconds\":$secs,\"peak_rss_mib\":$((kb / 1024)),\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >> "$RESULTS/scan.jsonl"
}

# A checksum of an output folder that ignores the columns a run stamps
# (run id, detection time) and the file layout: two runs that decided the
# same thing print the same line.
checksum() { python3 bench/checksum.py "$1"; }

# The narrow columns detection reads, decoded and summed and nothing else:
# the floor for any one-pass design on this engine. (Sums, not counts: a
# count is answered from the footers' statistics without reading a page.)
NARROW="SELECT sum(length(event_id)), sum(length(key)), sum(seq), sum(attempts), sum(CAST(event_time AS BIGINT)), sum(length(status)), sum(length(error)) FROM archive"

: > "$RESULTS/scan.jsonl"
for EVENTS in $SIZES; do
  ARCHIVE="$WORK/archive-$EVENTS"
  if [ ! -d "$ARCHIVE" ]; then
    "$BIN" generate --out "$ARCHIVE" --events "$EVENTS" --keys "$KEYS" --seed 1 --days 7 --files-per-day 4
  fi
  echo "== $EVENTS events: $(du -sh "$ARCHIVE" | cut -f1), load $(cut -d' ' -f1-3 /proc/loadavg)"
  # A downstream snapshot for reconcile: each key's processed events up to
  # the middle of the 7 days, one less for the keys ending in 7 (a tenth
  # of them disagree).
  SNAPSHOT="$WORK/snapshot-$EVENTS.parquet"
  if [ ! -f "$SNAPSHOT" ]; then
    "$BIN" sql --allow-writes --source "$ARCHIVE" "COPY (SELECT key, count(*) - CASE WHEN right(key, 1) = '7' THEN 1 ELSE 0 END AS value, TIMESTAMP '2024-01-04T12:00:00Z' AS as_of FROM processed WHERE event_time <= TIMESTAMP '2024-01-04T12:00:00Z' GROUP BY key) TO '$SNAPSHOT' STORED AS PARQUET" > /dev/null
  fi
  rounds=$ROUNDS
  [ "$EVENTS" -ge 50000000 ] && rounds=$ROUNDS_LARGE
  for i in $(seq 1 "$rounds"); do
    rm -rf "$WORK/out-backfill" "$WORK/out-limited" "$WORK/out-duckdb"
    measure "backfill-$EVENTS-$i" "$BIN" run --source "$ARCHIVE" --out "$WORK/out-backfill" --run-id "bench-$i" --progress off --report "$WORK/report-$EVENTS-$i.json"
    measure "limited-$EVENTS-$i" "$BIN" run --source "$ARCHIVE" --out "$WORK/out-limited" --run-id "bench-$i" --progress off --memory-limit "$LIMIT" --report "$WORK/report-limited-$EVENTS-$i.json"
    measure "duckdb-$EVENTS-$i" python3 bench/duckdb_backfill.py "$ARCHIVE" "$WORK/out-duckdb"
    measure "duckdbdetect-$EVENTS-$i" python3 bench/duckdb_backfill.py --detect-only "$ARCHIVE"
    measure "scan-$EVENTS-$i" "$BIN" sql --source "$ARCHIVE" "$NARROW"
    # State as of the middle of the 7 days, every key, then one key (pruned).
    measure "stateat-$EVENTS-$i" "$BIN" state-at --source "$ARCHIVE" --at 2024-01-04T12:00:00Z --format csv --progress off
    measure "stateatkey-$EVENTS-$i" "$BIN" state-at --source "$ARCHIVE" --at 2024-01-04T12:00:00Z --key key-00042 --format csv --progress off
    # The detections beside the run's (issue 11): each one narrow pass of
    # its own, alone and added to a run (the run's outputs go elsewhere).
    measure "silences-$EVENTS-$i" "$BIN" silences --source "$ARCHIVE" --format csv --progress off
    measure "anomalies-$EVENTS-$i" "$BIN" anomalies --source "$ARCHIVE" --format csv --progress off
    measure "reconcile-$EVENTS-$i" "$BIN" reconcile --source "$ARCHIVE" --snapshot "$SNAPSHOT" --expected "count(*)" --format csv --progress off
    rm -rf "$WORK/out-detections"
    measure "detections-$EVENTS-$i" "$BIN" run --source "$ARCHIVE" --out "$WORK/out-detections" --run-id "bench-$i" --progress off \
      --silences --anomalies --reconcile-snapshot "$SNAPSHOT" --reconcile-expected "count(*)"
    a=$(checksum "$WORK/out-backfill"); b=$(checksum "$WORK/out-limited")
    if [ "$a" != "$b" ]; then
      echo "outputs differ between the unlimited and the $LIMIT run: $a / $b" >&2
      exit 1
    fi
    echo "outputs identical with --memory-limit $LIMIT: $a"
  done
  cp "$WORK/report-$EVENTS-1.json" "$RESULTS/backfill-report-$EVENTS.json"
  cp "$WORK/duckdb-$EVENTS-1.out" "$RESULTS/duckdb-report-$EVENTS.json"
done
# Application logs (issue 11): a run with and without the worker's logs,
# on an archive generated with them (LOGS_EVENTS, default 5M; 0 skips).
LOGS_EVENTS="${LOGS_EVENTS:-5000000}"
if [ "$LOGS_EVENTS" -gt 0 ]; then
  EVENTS=$LOGS_EVENTS
  LARCHIVE="$WORK/logs-archive-$EVENTS"
  ARCHIVE="$LARCHIVE/archive"
  if [ ! -d "$LARCHIVE/archive" ]; then
    "$BIN" generate --out "$LARCHIVE/archive" --logs "$LARCHIVE/logs" --events "$EVENTS" --keys 5000 --seed 1 > /dev/null
  fi
  echo "== logs: $EVENTS events, $(du -sh "$LARCHIVE/archive" | cut -f1) of archive, $(du -sh "$LARCHIVE/logs" | cut -f1) of logs"
  for i in $(seq 1 "$ROUNDS"); do
    rm -rf "$WORK/out-logs"
    measure "nologs-$EVENTS-$i" "$BIN" run --source "$LARCHIVE/archive" --out "$WORK/out-logs" --run-id "a-$i" --progress off
    rm -rf "$WORK/out-logs"
    measure "logs-$EVENTS-$i" "$BIN" run --source "$LARCHIVE/archive" --logs "$LARCHIVE/logs" --out "$WORK/out-logs" --run-id "b-$i" --progress off
  done
fi

python3 - "$RESULTS/scan.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
sizes = sorted({r["events"] for r in rows if r["name"].startswith("backfill-")})
def med(kind, n, key):
    v = [r[key] for r in rows if r["name"].startswith(kind + "-") and r["events"] == n]
    return statistics.median(v) if v else float("nan")
print(f"{'events':>10} {'backfill':>9} {'1G limit':>9} {'duckdb':>8} {'ddb det.':>8} {'scan':>6} "
      f"{'ratio':>6} {'us/event':>8} {'x scan':>6} {'RSS MiB':>8} {'1G RSS':>7} {'ddb RSS':>7}")
for n in sizes:
    b, l, d, dd, s = (med(k, n, "seconds") for k in ("backfill", "limited", "duckdb", "duckdbdetect", "scan"))
    print(f"{n:>10} {b:>8.2f}s {l:>8.2f}s {d:>7.2f}s {dd:>7.2f}s {s:>5.2f}s {b/d:>6.2f} {b/n*1e6:>8.3f} "
          f"{b/s:>6.2f} {med('backfill', n, 'peak_rss_mib'):>8} {med('limited', n, 'peak_rss_mib'):>7} "
          f"{med('duckdb', n, 'peak_rss_mib'):>7}")
print()
# The detections of issue 11: alone, and a run with silences, anomalies
# and reconcile against the same run without them.
print(f"{'events':>10} {'scan':>6} {'silences':>9} {'anomalies':>9} {'reconcile':>9} {'run':>7} {'run+3':>7} {'added':>7}")
for n in sizes:
    s, si, an, rc, b, d = (med(k, n, "seconds") for k in ("scan", "silences", "anomalies", "reconcile", "backfill", "detections"))
    print(f"{n:>10} {s:>5.2f}s {si:>8.2f}s {an:>8.2f}s {rc:>8.2f}s {b:>6.2f}s {d:>6.2f}s {d-b:>6.2f}s")
for n in sorted({r["events"] for r in rows if r["name"].startswith("logs-")}):
    nl, lg = med("nologs", n, "seconds"), med("logs", n, "seconds")
    print(f"logs, {n} events: run {nl:.2f}s, run --logs {lg:.2f}s (+{lg - nl:.2f}s), "
          f"{med('logs', n, 'peak_rss_mib')} MiB peak")
PY

# Cluster mode (issue 10): on the 10M archive, or the largest measured.
if [ -z "${SKIP_CLUSTER:-}" ]; then
  CEVENTS="${CLUSTER_EVENTS:-10000000}"
  [ -d "$WORK/archive-$CEVENTS" ] || CEVENTS=$(echo $SIZES | tr ' ' '\n' | sort -n | tail -1)
  BIN="$BIN" ARCHIVE="$WORK/archive-$CEVENTS" WORK="$WORK/cluster" scripts/bench-cluster.sh | tee "$RESULTS/cluster.txt"
fi

if [ -z "${SKIP_KAFKA:-}" ] && [ -x scripts/bench-kafka.sh ]; then
  scripts/bench-kafka.sh
fi
