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
#   end_to_end = messages / elapsed of the Kafka run (listing, scan, decide,
#                produce, acknowledgements, ledger, manifest: the whole job)
#   produce    = messages / produce window, from the first message handed to
#                librdkafka to the end of the run: every acknowledgement
#                awaited, then the ledger and the manifest written. The
#                messages carry their production time (`timestamp =
#                "produce_time"`), so the window starts at the earliest
#                timestamp on the topic (each partition's first message, read
#                back at the offset the report names) and ends when the
#                process exits.
# Python's rate is messages / (first produce() .. flush() returned), the same
# window, with the keys and headers built inside the timed loop as a replay
# script would. Rounds alternate backfill and Python; medians are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
MESSAGES="${KAFKA_MESSAGES:-1000000}"
KEYS="${KAFKA_KEYS:-10000}"
PARTITIONS="${KAFKA_PARTITIONS:-3}"
ROUNDS="${KAFKA_ROUNDS:-3}"
WORK="${BENCH_DIR:-$CACHE/bench}/kafka"
RESULTS="${BENCH_RESULTS:-bench/results}"
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
  RELEASE_TARGET="${BENCH_TARGET_DIR:-$CACHE/target-release}"
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
# The production time as the message timestamp: the produce window's clock.
JOB="$WORK/bench-kafka.toml"
cat >"$JOB" <<'EOF'
[kafka]
timestamp = "produce_time"
original_topic_column = "_bench_none"
original_partition_column = "_bench_none"
original_offset_column = "_bench_none"
original_timestamp_column = "_bench_none"
EOF
FLAGS=(--job "$JOB" --source "$ARCHIVE" --done-status never_matches --max-attempts 1000000000
       --no-gaps --no-conflicts --progress off)

elapsed_ms() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["elapsed_ms"])' "$1"; }
replayed() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["replayed"])' "$1"; }
# The earliest production timestamp of a run's messages: each partition's
# first message, at the offset the run's report names (outputs.replay.outputs:
# TOPIC/P:FIRST-LAST; the first offset of a fresh topic starts a record batch,
# which is where Tansu can serve a fetch from).
first_ms() { # BOOTSTRAP REPORT
  python3 - "$1" "$2" <<'PY'
import json, sys
from confluent_kafka import Consumer, TopicPartition
bootstrap, report = sys.argv[1], sys.argv[2]
spans = json.load(open(report))["outputs"]["replay"]["outputs"]
times = []
for span in spans:
    topic_part, offsets = span.rsplit(":", 1)
    topic, partition = topic_part.rsplit("/", 1)
    offset = int(offsets.split("-")[0])
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-window",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, int(partition), offset)])
    m = c.poll(10)
    c.close()
    if m is None or m.error() or m.offset() != offset:
        sys.exit(f"error: cannot read {topic}/{partition} at offset {offset}")
    times.append(m.timestamp()[1])
print(min(times))
PY
}
now_ms() { python3 -c 'import time; print(int(time.time() * 1000))'; }

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
  END="$(now_ms)"
  N="$(replayed "$WORK/kafka-$round.json")"
  DRY="$(elapsed_ms "$WORK/dry-$round.json")"
  RUN="$(elapsed_ms "$WORK/kafka-$round.json")"
  FIRST="$(first_ms "$BOOTSTRAP" "$WORK/kafka-$round.json")"
  WINDOW=$((END - FIRST))
  echo "{\"side\":\"backfill\",\"round\":$round,\"messages\":$N,\"run_ms\":$RUN,\"dry_run_ms\":$DRY,\"produce_window_ms\":$WINDOW}" >>"$LINES"
  echo "round $round: backfill replayed $N messages: run ${RUN} ms, produce window ${WINDOW} ms (dry run ${DRY} ms)"

  PTOPIC="bench-python-$round"
  topic "$PTOPIC"
  python3 bench/kafka_producer.py "$BOOTSTRAP" "$PTOPIC" "$N" "$KEYS" "$VALUE_BYTES" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); r["side"]="python"; r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$round" \
    | tee -a "$LINES" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print("round %d: python sent %d messages in %s s" % (r["round"], r["delivered"], r["seconds"]))'
done

python3 - "$LINES" "$RESULTS/kafka.json" "$PARTITIONS" "$KEYS" "$VALUE_BYTES" "$("$TANSU" --version 2>/dev/null || echo unknown)" <<'PY'
import json, statistics, sys
lines, out, partitions, keys, value_bytes, tansu = sys.argv[1:7]
rows = [json.loads(l) for l in open(lines)]
rust = [r for r in rows if r["side"] == "backfill"]
py = [r for r in rows if r["side"] == "python"]
n = rust[0]["messages"]
e2e = statistics.median(r["messages"] / (r["run_ms"] / 1000) for r in rust)
produce = statistics.median(r["messages"] / max(r["produce_window_ms"], 1) * 1000 for r in rust)
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
        "produce_messages_per_second": round(produce),
        "end_to_end_messages_per_second": round(e2e),
        "dry_run_seconds": round(statistics.median(r["dry_run_ms"] for r in rust) / 1000, 2),
        "runs": rust,
    },
    "python_confluent_kafka": {
        "messages_per_second": round(python),
        "librdkafka": py[0].get("librdkafka"),
        "runs": py,
    },
    "ratio_produce": round(produce / python, 2),
    "ratio_end_to_end": round(e2e / python, 2),
}
json.dump(result, open(out, "w"), indent=2)
print(f"\nKafka replay, {n} messages, {value_bytes}-byte values, 7 headers, {partitions} partitions, median of {len(rust)}:")
print(f"  backfill produce window (first message .. run committed):       {produce:,.0f} msg/s")
print(f"  python confluent-kafka producer (first produce .. flush):        {python:,.0f} msg/s")
print(f"  backfill end to end (list, scan, decide, produce, commit):       {e2e:,.0f} msg/s")
print(f"  backfill scan + decide alone (dry run, median):                  {statistics.median(r['dry_run_ms'] for r in rust) / 1000:.2f} s")
print(f"  ratio backfill/python: produce {produce / python:.2f}x, end to end {e2e / python:.2f}x")
print(f"  written to {out}")
PY
