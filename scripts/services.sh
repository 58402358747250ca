#!/usr/bin/env bash
# The real servers, for trying backfill by hand: a Kafka-protocol broker
# (Tansu, memory storage) on 127.0.0.1:19092 and an S3-compatible server
# (s3s-fs) on 127.0.0.1:19000 serving /tmp/backfill-services/s3.
#
#   scripts/services.sh start          start both in the background, print the env exports
#   scripts/services.sh status         which are running
#   scripts/services.sh stop           stop both
#   scripts/services.sh topic NAME [N] create a topic with N partitions (default 3)
#   scripts/services.sh bucket NAME    create a bucket (a folder under the S3 root)
#
# The tests do not use these: they start their own servers on free ports.
# Binaries come from scripts/install-tools.sh; nothing is downloaded here.
set -euo pipefail

CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
BIN="$CACHE/bin"
DIR="${BACKFILL_SERVICES_DIR:-/tmp/backfill-services}"
KAFKA_PORT="${BACKFILL_KAFKA_PORT:-19092}"
S3_PORT="${BACKFILL_S3_PORT:-19000}"
S3_ACCESS_KEY="backfill"
S3_SECRET_KEY="backfill-secret"

need() {
  if [ ! -x "$BIN/$1" ]; then
    echo "error: $1 is not installed at $BIN/$1: run scripts/install-tools.sh" >&2
    exit 1
  fi
}

running() { # NAME -> 0 when its pid file names a live process
  local pidfile="$DIR/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

wait_port() { # NAME PORT
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
      return 0
    fi
    if ! running "$1"; then
      echo "error: $1 exited; its log ($DIR/$1.log):" >&2
      tail -n 20 "$DIR/$1.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "error: $1 is not listening on 127.0.0.1:$2 after 10 s; see $DIR/$1.log" >&2
  exit 1
}

start_one() { # NAME PORT COMMAND...
  local name="$1" port="$2"
  shift 2
  if running "$name"; then
    echo "$name: already running (pid $(cat "$DIR/$name.pid"))"
    return
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: port $port is taken by another process; set BACKFILL_${name^^}_PORT" >&2
    exit 1
  fi
  nohup "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
  wait_port "$name" "$port"
  echo "$name: running on 127.0.0.1:$port (pid $(cat "$DIR/$name.pid"), log $DIR/$name.log)"
}

stop_one() { # NAME
  local name="$1"
  if running "$name"; then
    kill "$(cat "$DIR/$name.pid")"
    echo "$name: stopped"
  else
    echo "$name: not running"
  fi
  rm -f "$DIR/$name.pid"
}

print_env() {
  cat <<EOF
# paste into your shell:
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
export BACKFILL_KAFKA=kafka://127.0.0.1:$KAFKA_PORT
# then e.g.: scripts/services.sh bucket lake; scripts/services.sh topic replay
#            backfill run --source s3://lake/events --replay-sink \$BACKFILL_KAFKA/replay ...
EOF
}

case "${1:-}" in
  start)
    need tansu
    need s3s-fs
    mkdir -p "$DIR/s3"
    start_one kafka "$KAFKA_PORT" "$BIN/tansu" broker \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine memory://tansu/
    start_one s3 "$S3_PORT" "$BIN/s3s-fs" --host 127.0.0.1 --port "$S3_PORT" \
      --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$DIR/s3"
    print_env
    ;;
  stop)
    stop_one kafka
    stop_one s3
    ;;
  status)
    for name in kafka s3; do
      if running "$name"; then
        echo "$name: running (pid $(cat "$DIR/$name.pid"))"
      else
        echo "$name: stopped"
      fi
    done
    running kafka && running s3 && print_env
    ;;
  topic)
    [ -n "${2:-}" ] || { echo "usage: $0 topic NAME [PARTITIONS]" >&2; exit 2; }
    need tansu
    "$BIN/tansu" topic create "$2" --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions "${3:-3}"
    echo "topic $2: created on 127.0.0.1:$KAFKA_PORT"
    ;;
  bucket)
    [ -n "${2:-}" ] || { echo "usage: $0 bucket NAME" >&2; exit 2; }
    mkdir -p "$DIR/s3/$2"
    echo "bucket $2: created ($DIR/s3/$2)"
    ;;
  *)
    echo "usage: $0 start|stop|status|topic NAME [PARTITIONS]|bucket NAME" >&2
    exit 2
    ;;
esac
