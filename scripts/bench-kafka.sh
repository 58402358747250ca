#!/usr/bin/env bash
# The Kafka replay throughput benchmark (part of `make bench`, never a test):
# backfill replays ~1,000,000 messages from a generated archive to a private
# Tansu broker, and Python's confluent-kafka producer (bench/kafka_producer.py)
# sends the same number of messages (same value size, same keys, the same 7
# backfill.* headers, idempotence on) to the same broker in the same session.
# Both rates go to stdout and to bench/results/kafka.json.
#
#   scripts/bench-kafka.sh                      # 1M messages, 3 rounds
#   KAFKA_MESSAGES=200000 KAFKA_ROUNDS=1 scripts/bench-kafka.sh
#   BACKFILL_BIN=/path/to/backfill scripts/bench-kafka.sh   # skip the build
#
# How backfill is measured: every event of the archive is made a candidate
# (`--done-status never_matches`, no attempt limit, no conflict DLQ), so the
# replay set is the archive's events. Each round runs the job twice on the
# same archive: `--dry-run` (scan + decide, nothing written) and with
# `--replay-sink kafka://...` (scan + decide + produce + every delivery
# acknowledged + commit). Reported:
#   end_to_end  = messages / elapsed of the Kafka run (scan and decide included)
#   produce     = messages / (time the Kafka run spent deciding and committing
#                 - time the dry run spent deciding), from the reports'
#                 phase_ms: what producing and awaiting every acknowledgement
#                 added to the run (the ledger and manifest writes included)
# Python's rate is messages / (first produce() .. flush() returned), with the
# messages' keys and headers built inside the timed loop, as a replay script
# would. Rounds alternate backfill and Python; the medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
MESSAGES="${KAFKA_MESSAGES:-1000000}"
KEYS="${KAFKA_KEYS:-10000}"
PARTITIONS="${KAFKA_PARTITIONS:-3}"
ROUNDS="${KAFKA_ROUNDS:-3}"
WORK="${BENCH_DIR:-$CACHE/bench}/kafka"
RESULTS=bench/results
TANSU="$CACHE/bin/tansu"
mkdir -p "$RESULTS" "$WORK"

if [ ! -x "$TANSU" ]; then
  echo "error: tansu is not installed at $TANSU: run scripts/install-tools.sh" >&2
  exit 1
fi
python3 -c "import confluent_kafka" 2>/dev/null || pip install --quiet confluent-kafka

if [ -n "${BACKFILL_BIN:-}" ]; then
  BIN="$BACKFILL_BIN"
else
  # A release build of its own: thin LTO, ~15 minutes cold on 2 cores, then
  # a no-op while the sources are unchanged.
  RELEASE_TARGET="$CACHE/target-release"
  CARGO_TARGET_DIR="$RELEASE_TARGET" cargo build --release --bin backfill
  BIN="$RELEASE_TARGET/release/backfill"
fi

# A private broker on a free port, killed however this script ends.
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 </dev/null &
TANSU_PID=$!
trap 'kill "$TANSU_PID" 2>/dev/null || true; wait "$TANSU_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 "$TANSU_PID" 2>/dev/null || { echo "error: tansu exited:" >&2; tail "$WORK/tansu.log" >&2; exit 1; }
  sleep 0.1
done
BOOTSTRAP="127.0.0.1:$PORT"
topic() { "$TANSU" topic create "$1" --broker "tcp://$BOOTSTRAP" --partitions "$PARTITIONS" >/dev/null; }
echo "tansu: $("$TANSU" --version 2>/dev/null || echo tansu) on $BOOTSTRAP, $PARTITIONS partitions per topic"

# The archive: ~2% more events than messages (some are generated missing).
EVENTS=$((MESSAGES + MESSAGES / 50))
ARCHIVE="$WORK/archive-$EVENTS-$KEYS"
if [ ! -d "$ARCHIVE" ]; then
  "$BIN" generate --out "$ARCHIVE" --events "$EVENTS" --keys "$KEYS" --seed 11 --days 1 --files-per-day 4 >/dev/null
fi
VALUE_BYTES="$("$BIN" sql --source "$ARCHIVE" --format csv \
  "SELECT CAST(round(avg(octet_length(CAST(payload AS VARCHAR)))) AS BIGINT) AS b FROM events" | tail -n 1)"

# The same 7 headers as the Python side: the generated rows' Kafka
# coordinates (backfill.original.*) are left out by naming no such column.
JOB="$WORK/bench-kafka.toml"
cat >"$JOB" <<'EOF'
[kafka]
original_topic_column = "_bench_none"
original_partition_column = "_bench_none"
original_offset_column = "_bench_none"
original_timestamp_column = "_bench_none"
EOF
FLAGS=(--job "$JOB" --source "$ARCHIVE" --done-status never_matches --max-attempts 1000000000
       --no-gaps --no-conflicts --progress off)

elapsed_ms() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["elapsed_ms"])' "$1"; }
replayed() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["replayed"])' "$1"; }
# decide (the replays enqueued as they are decided) + commit (every delivery
# acknowledged, the ledger, the manifest), from the report's phase timings.
decide_commit_ms() {
  python3 -c 'import json,sys; p=json.load(open(sys.argv[1])).get("phase_ms",{}); print(p.get("decide",0)+p.get("commit",0))' "$1"
}

LINES="$WORK/kafka.jsonl"
: >"$LINES"
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/out-dry" "$WORK/out-kafka"
  "$BIN" run "${FLAGS[@]}" --out "$WORK/out-dry" --run-id "dry-$round" --dry-run \
    --report "$WORK/dry-$round.json" >/dev/null
  TOPIC="bench-rust-$round"
  topic "$TOPIC"
  "$BIN" run "${FLAGS[@]}" --out "$WORK/out-kafka" --run-id "kafka-$round" \
    --replay-sink "kafka://$BOOTSTRAP/$TOPIC" --report "$WORK/kafka-$round.json" >/dev/null
  N="$(replayed "$WORK/kafka-$round.json")"
  DRY="$(elapsed_ms "$WORK/dry-$round.json")"
  RUN="$(elapsed_ms "$WORK/kafka-$round.json")"
  DRY_DECIDE="$(decide_commit_ms "$WORK/dry-$round.json")"
  RUN_DECIDE="$(decide_commit_ms "$WORK/kafka-$round.json")"
  echo "{\"side\":\"backfill\",\"round\":$round,\"messages\":$N,\"run_ms\":$RUN,\"dry_run_ms\":$DRY,\"decide_commit_ms\":$RUN_DECIDE,\"dry_decide_ms\":$DRY_DECIDE}" >>"$LINES"
  echo "round $round: backfill replayed $N messages in ${RUN} ms (dry run ${DRY} ms; decide+commit ${RUN_DECIDE} ms, dry decide ${DRY_DECIDE} ms)"

  PTOPIC="bench-python-$round"
  topic "$PTOPIC"
  python3 bench/kafka_producer.py "$BOOTSTRAP" "$PTOPIC" "$N" "$KEYS" "$VALUE_BYTES" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); r["side"]="python"; r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$round" \
    | tee -a "$LINES" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(f"round {r[\"round\"]}: python sent {r[\"delivered\"]} messages in {r[\"seconds\"]} s")'
done

python3 - "$LINES" "$RESULTS/kafka.json" "$PARTITIONS" "$KEYS" "$VALUE_BYTES" "$("$TANSU" --version 2>/dev/null || echo unknown)" <<'PY'
import json, statistics, sys
lines, out, partitions, keys, value_bytes, tansu = sys.argv[1:7]
rows = [json.loads(l) for l in open(lines)]
rust = [r for r in rows if r["side"] == "backfill"]
py = [r for r in rows if r["side"] == "python"]
n = rust[0]["messages"]
e2e = statistics.median(r["messages"] / (r["run_ms"] / 1000) for r in rust)
def produce_ms(r):
    # The phases that differ between the two runs when the report has them;
    # else the whole difference.
    if r.get("decide_commit_ms") and r.get("dry_decide_ms"):
        return r["decide_commit_ms"] - r["dry_decide_ms"]
    return r["run_ms"] - r["dry_run_ms"]
produce = statistics.median(r["messages"] / max(produce_ms(r), 1) * 1000 for r in rust)
python = statistics.median(r["messages_per_second"] for r in py)
result = {
    "messages": n,
    "partitions": int(partitions),
    "keys": int(keys),
    "value_bytes": int(value_bytes),
    "headers": 7,
    "broker": tansu,
    "rounds": len(rust),
    "backfill": {
        "end_to_end_messages_per_second": round(e2e),
        "produce_messages_per_second": round(produce),
        "runs": rust,
    },
    "python_confluent_kafka": {
        "messages_per_second": round(python),
        "librdkafka": py[0].get("librdkafka"),
        "runs": py,
    },
    "ratio_end_to_end": round(e2e / python, 2),
    "ratio_produce": round(produce / python, 2),
}
json.dump(result, open(out, "w"), indent=2)
print(f"\nKafka replay, {n} messages, {value_bytes}-byte values, 7 headers, {partitions} partitions, median of {len(rust)}:")
print(f"  backfill end to end (scan + decide + produce + acks + commit): {e2e:,.0f} msg/s")
print(f"  backfill produce phase (decide+commit minus dry-run decide):   {produce:,.0f} msg/s")
print(f"  python confluent-kafka producer:                               {python:,.0f} msg/s")
print(f"  ratio backfill/python: end to end {e2e / python:.2f}x, produce phase {produce / python:.2f}x")
print(f"  written to {out}")
PY
