#!/usr/bin/env bash
# `make minio-demo`: start MinIO with docker compose (docker-compose.yml),
# create the bucket, write a generated archive into s3://backfill/archive
# through the S3 API, and run jobs/minio.toml over it: archive, outputs and
# state all in MinIO.
#
# Exit codes: 0 done; 2 Docker (or docker compose) is not available; other
# codes are backfill's own (1 runtime failure, ...).
#
# Environment:
#   BACKFILL_S3_ENDPOINT  use an S3-compatible server that is already running
#                         (e.g. s3s-fs, as the tests do) instead of starting
#                         MinIO; the bucket `backfill` must exist and
#                         AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY be set.
#   BACKFILL_BIN          the backfill binary (default: cargo build, debug)
#   MINIO_DEMO_EVENTS     events to generate (default 200000)
#   MINIO_DEMO_REPORT     where to write the JSON report (default demo/minio-report.json)
#   DOCKER                the docker command (default docker)
#   MINIO_ROOT_USER, MINIO_ROOT_PASSWORD   MinIO's keys (default backfill / backfill-secret)
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER="${DOCKER:-docker}"
EVENTS="${MINIO_DEMO_EVENTS:-200000}"
REPORT="${MINIO_DEMO_REPORT:-demo/minio-report.json}"

die_no_docker() {
  echo "minio-demo: $1; the demo needs Docker with the compose plugin to start MinIO." >&2
  echo "minio-demo: to use an S3-compatible server that is already running, set BACKFILL_S3_ENDPOINT (and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)." >&2
  exit 2
}

if [ -n "${BACKFILL_S3_ENDPOINT:-}" ]; then
  export AWS_ENDPOINT_URL="$BACKFILL_S3_ENDPOINT"
  : "${AWS_ACCESS_KEY_ID:?minio-demo: set AWS_ACCESS_KEY_ID for $BACKFILL_S3_ENDPOINT}"
  : "${AWS_SECRET_ACCESS_KEY:?minio-demo: set AWS_SECRET_ACCESS_KEY for $BACKFILL_S3_ENDPOINT}"
  echo "minio-demo: using the S3 endpoint $AWS_ENDPOINT_URL (bucket backfill must exist)"
else
  command -v "$DOCKER" >/dev/null 2>&1 || die_no_docker "Docker is not installed ('$DOCKER' not found)"
  "$DOCKER" info >/dev/null 2>&1 || die_no_docker "the Docker daemon is not running or not reachable ('$DOCKER info' failed)"
  if "$DOCKER" compose version >/dev/null 2>&1; then
    compose=("$DOCKER" compose)
  elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
  else
    die_no_docker "Docker's compose plugin is not installed"
  fi
  echo "minio-demo: starting MinIO (docker compose up) and creating the bucket"
  "${compose[@]}" up -d --wait minio
  "${compose[@]}" run --rm createbucket
  export AWS_ENDPOINT_URL="http://127.0.0.1:9000"
  export AWS_ACCESS_KEY_ID="${MINIO_ROOT_USER:-backfill}"
  export AWS_SECRET_ACCESS_KEY="${MINIO_ROOT_PASSWORD:-backfill-secret}"
fi
export AWS_REGION="${AWS_REGION:-us-east-1}"
export AWS_ALLOW_HTTP="${AWS_ALLOW_HTTP:-true}"

BIN="${BACKFILL_BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --bin backfill
  BIN="${CARGO_TARGET_DIR:-target}/debug/backfill"
fi

mkdir -p "$(dirname "$REPORT")"
echo "minio-demo: writing a generated archive ($EVENTS events) to s3://backfill/archive"
"$BIN" generate --out s3://backfill/archive --events "$EVENTS" --keys 500 --seed 7 --days 3
echo "minio-demo: running jobs/minio.toml"
"$BIN" run --job jobs/minio.toml --report "$REPORT"
echo
echo "report:   $REPORT"
echo "outputs:  s3://backfill/out/replay/  s3://backfill/out/dlq/  s3://backfill/out/gaps/"
echo "state:    s3://backfill/out/_state/   (backfill state runs --job jobs/minio.toml)"
