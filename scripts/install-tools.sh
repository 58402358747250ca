#!/usr/bin/env bash
# Installs the real servers the integration tests talk to (a Kafka-protocol
# broker and an S3-compatible server) into a cache outside the clone, the
# Python packages the benchmarks compare against, and (`airflow`) Apache
# Airflow for the DAG's test. Idempotent: a tool already
# present at the pinned version is reused, so a warm machine pays nothing.
set -euo pipefail

CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

TANSU_VERSION="${TANSU_VERSION:-}"
S3S_FS_VERSION="0.14.1"

install_s3s_fs() {
  if [ -x "$BIN/s3s-fs" ] && [ -f "$CACHE/s3s-fs.version" ] && [ "$(cat "$CACHE/s3s-fs.version")" = "$S3S_FS_VERSION" ]; then
    echo "s3s-fs $S3S_FS_VERSION: cached at $BIN/s3s-fs"
    return
  fi
  echo "installing s3s-fs $S3S_FS_VERSION into $CACHE (about 2 minutes)"
  cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$CACHE"
  echo "$S3S_FS_VERSION" > "$CACHE/s3s-fs.version"
}

install_tansu() {
  if [ -x "$BIN/tansu" ]; then
    echo "tansu: cached at $BIN/tansu"
    return
  fi
  echo "installing tansu into $CACHE (about 8 minutes on 2 cores)"
  if [ -n "$TANSU_VERSION" ]; then
    cargo install "tansu@$TANSU_VERSION" --locked --features dynostore --root "$CACHE"
  else
    cargo install tansu --locked --features dynostore --root "$CACHE"
  fi
}

case "${1:-all}" in
  s3s-fs) install_s3s_fs ;;
  tansu) install_tansu ;;
  # Apache Airflow 3 in a venv, for the DAG's test: scripts/install-airflow.sh.
  airflow) "$(dirname "$0")/install-airflow.sh" >/dev/null ;;
  all) install_s3s_fs; install_tansu ;;
  *) echo "usage: $0 [all|s3s-fs|tansu|airflow]" >&2; exit 2 ;;
esac
