#!/usr/bin/env bash
# Installs the real servers the integration tests talk to (a Kafka-protocol
# broker and an S3-compatible server) into a cache outside the clone, the
# Python packages the benchmarks compare against, (`airflow`) Apache
# Airflow for the DAG's test, and (`system`, part of `all`) the system
# packages the build needs. Idempotent: a tool already present at the
# pinned version is reused, so a warm machine pays nothing.
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

# redis-server for the Redis sink's tests: the Debian package, installed
# with apt when neither PATH nor the cache has it (one `apt-get update`
# first, sudo when not root), then linked into the cache's bin, where the
# test fixture looks first. Elsewhere the message says what to install.
install_redis() {
  if [ -x "$BIN/redis-server" ]; then
    echo "redis-server: cached at $BIN/redis-server"
    return
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "the Redis tests need redis-server: install it (Debian, Ubuntu: redis-server; Fedora: redis; macOS: brew install redis)" >&2
      exit 1
    fi
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing redis-server with apt-get"
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server
  fi
  ln -sf "$(command -v redis-server)" "$BIN/redis-server"
  echo "redis-server: $("$BIN/redis-server" --version | head -c 60)"
}

# librdkafka is built with rdkafka's `ssl` feature against the system's
# OpenSSL, which openssl-sys finds with pkg-config: its headers and
# pkg-config must be installed. With apt, the missing ones are installed
# (one `apt-get update` first, sudo when not root); elsewhere the message
# names what to install. Nothing is done when pkg-config finds OpenSSL.
SYSTEM_PACKAGES=(libssl-dev pkg-config)
install_system() {
  if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; then
    echo "OpenSSL $(pkg-config --modversion openssl) and pkg-config: present"
    return
  fi
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "the build needs OpenSSL's headers and pkg-config: install them (Debian, Ubuntu: ${SYSTEM_PACKAGES[*]}; Fedora: openssl-devel pkgconf; macOS: brew install openssl@3 pkg-config)" >&2
    exit 1
  fi
  local missing=() p
  for p in "${SYSTEM_PACKAGES[@]}"; do
    if ! dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "${SYSTEM_PACKAGES[*]} are installed, yet pkg-config does not find openssl (PKG_CONFIG_PATH?)" >&2
    exit 1
  fi
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "installing ${missing[*]} with apt-get"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

case "${1:-all}" in
  s3s-fs) install_s3s_fs ;;
  tansu) install_tansu ;;
  # Apache Airflow 3 in a venv, for the DAG's test: scripts/install-airflow.sh.
  airflow) "$(dirname "$0")/install-airflow.sh" >/dev/null ;;
  system) install_system ;;
  redis) install_redis ;;
  all) install_system; install_s3s_fs; install_tansu; install_redis ;;
  *) echo "usage: $0 [all|system|s3s-fs|tansu|redis|airflow]" >&2; exit 2 ;;
esac
