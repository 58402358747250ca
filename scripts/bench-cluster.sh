#!/usr/bin/env bash
# Cluster mode against in-process and against two shards side by side
# (issue 10), on the archive of scripts/bench.sh: a `backfill scheduler`
# and two `backfill executor`s of one task slot each on this machine (the
# archive read through --cluster-shared-fs), the same release binary.
# Prints wall time, peak RSS of the client, the bytes each mode read, and
# checks that the cluster's outputs are the in-process run's.
#
#   BIN=path/to/backfill ARCHIVE=dir scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:?the release binary}"
ARCHIVE="${ARCHIVE:?an archive folder}"
WORK="${WORK:-$(mktemp -d)}"
ROUNDS="${ROUNDS:-2}"
mkdir -p "$WORK"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SP=$(free_port)
"$BIN" scheduler --bind "127.0.0.1:$SP" --log-level warn > "$WORK/scheduler.log" 2>&1 &
PIDS=($!)
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
sleep 1
for i in 1 2; do
  mkdir -p "$WORK/exec-$i"
  "$BIN" executor --scheduler "df://127.0.0.1:$SP" --port "$(free_port)" --grpc-port "$(free_port)" \
    --concurrent-tasks 1 --work-dir "$WORK/exec-$i" --log-level warn > "$WORK/executor-$i.log" 2>&1 &
  PIDS+=($!)
done
sleep 2

# Bytes read by the executors (rchar: files and sockets, shuffles included).
read_bytes() { local t=0; for p in "${PIDS[@]:1}"; do t=$((t + $(awk '/^rchar/ {print $2}' "/proc/$p/io"))); done; echo "$t"; }
checksum() { python3 bench/checksum.py "$1"; }

echo "== cluster vs in-process vs 2 shards: $(du -sh "$ARCHIVE" | cut -f1), load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/here" "$WORK/there" "$WORK/shards"
  /usr/bin/time -f "%e %M" -o "$WORK/t" "$BIN" run --source "$ARCHIVE" --out "$WORK/here" --run-id b --progress off --report "$WORK/here.json" > /dev/null
  read -r s kb < "$WORK/t"
  echo "in-process: ${s}s, $((kb / 1024)) MiB, read $(python3 -c "import json;print(json.load(open('$WORK/here.json'))['bytes_scanned'])") bytes"
  before=$(read_bytes)
  /usr/bin/time -f "%e %M" -o "$WORK/t" "$BIN" run --source "$ARCHIVE" --out "$WORK/there" --run-id b --progress off \
    --cluster "df://127.0.0.1:$SP" --cluster-shared-fs --report "$WORK/there.json" > /dev/null
  read -r s kb < "$WORK/t"
  echo "cluster (1 scheduler, 2 executors x 1 slot): ${s}s, client $((kb / 1024)) MiB, executors read $(( $(read_bytes) - before )) bytes"
  start=$(date +%s.%N)
  shards=()
  for i in 0 1; do
    "$BIN" run --source "$ARCHIVE" --out "$WORK/shards" --run-id b --shard "$i/2" --progress off --report "$WORK/shard-$i.json" > /dev/null &
    shards+=($!)
  done
  for p in "${shards[@]}"; do wait "$p"; done
  end=$(date +%s.%N)
  echo "2 shards side by side: $(python3 -c "print(round($end - $start, 2))")s, read $(python3 -c "import json;print(sum(json.load(open(f'$WORK/shard-{i}.json'))['bytes_scanned'] for i in (0,1)))") bytes"
  a=$(checksum "$WORK/here"); b=$(checksum "$WORK/there")
  if [ "$a" != "$b" ]; then echo "the cluster's outputs differ: $a / $b" >&2; exit 1; fi
  echo "cluster outputs identical to in-process: $a"
done
