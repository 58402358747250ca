#!/bin/sh
# backfill-cron.sh JOB_FILE: one job's run over yesterday (UTC), for cron
# (jobs/crontab; docs/scheduling.md).
#
# Cron mails whatever a job prints. This prints nothing when the run
# succeeds: the run's output goes to the log file, and only a non-zero exit
# prints (a line saying what it means, then this run's part of the log), so
# only failures and dead letters (exit 3, --fail-on-dlq) page.
#
# - files named after the job: its base name and the CRC (cksum) of its
#   absolute path, so that a/nightly.toml and b/nightly.toml have a lock, a
#   log and reports each: NAME-CRC.lock, NAME-CRC.log, NAME-CRC-DAY.json;
# - a lock (flock -n): a second invocation while a run of the same job still
#   holds it prints that and exits 75, running nothing;
# - the environment comes from BACKFILL_ENV_FILE (KEY=VALUE lines, sourced:
#   what the job file expands, e.g. ${LAKE_BUCKET}, and credentials), never
#   from cron's almost empty one;
# - the window is [yesterday, today) in UTC, or [BACKFILL_DAY, +1 day): the
#   run id and the report are named after that day (nightly-2026-11-30,
#   nightly-2026-11-30.json), so a rerun the same day is a retry;
# - dates by epoch arithmetic, formatted with `date -u -d @N` (GNU, busybox)
#   or `date -u -r N` (BSD, macOS): no `date -d yesterday` (GNU only).
#
# Env: BACKFILL_ENV_FILE (/etc/backfill/backfill.env), BACKFILL_LOG_DIR
# (/var/log/backfill), BACKFILL_DAY
# (YYYY-MM-DD: another day than yesterday, e.g. to catch up), BACKFILL_BIN
# (backfill, from PATH).
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 JOB_FILE" >&2
  exit 2
fi
job=$1
log_dir=${BACKFILL_LOG_DIR:-/var/log/backfill}
env_file=${BACKFILL_ENV_FILE:-/etc/backfill/backfill.env}

# The absolute path, its folder's symlinks resolved: the same job reached by
# two spellings shares one lock. Cron starts in HOME.
case $job in
  /*) ;;
  *) job=$(pwd -P)/$job ;;
esac
base=${job##*/}
if dir=$(cd -P -- "${job%/*}/" 2>/dev/null && pwd -P); then
  job=${dir%/}/$base
fi
name=${base%.toml}
crc=$(printf '%s' "$job" | cksum)
tag=$name-$(printf '%08x' "${crc%% *}")

# A day (YYYY-MM-DD) from seconds since the epoch, on GNU and BSD date.
day_of() {
  date -u -d "@$1" +%Y-%m-%d 2>/dev/null || date -u -r "$1" +%Y-%m-%d
}
# Seconds since the epoch of a day's midnight (UTC), on GNU and BSD date.
epoch_of() {
  date -u -d "$1T00:00:00Z" +%s 2>/dev/null || date -u -j -f %Y-%m-%dT%H:%M:%S "$1T00:00:00" +%s
}

if ! mkdir -p "$log_dir"; then
  echo "backfill $name: cannot create the log folder $log_dir"
  exit 1
fi

# Held until this script exits (fd 9 stays open in the backfill it runs).
exec 9>>"$log_dir/$tag.lock"
if ! flock -n 9; then
  echo "backfill $name: skipped: a run of this job still holds $log_dir/$tag.lock"
  exit 75
fi

if [ -n "${BACKFILL_DAY:-}" ]; then
  start=$(epoch_of "$BACKFILL_DAY") || {
    echo "backfill $name: BACKFILL_DAY=$BACKFILL_DAY is not a day (YYYY-MM-DD)"
    exit 2
  }
else
  # Midnight UTC of yesterday: POSIX days are 86400 s.
  start=$(( $(date -u +%s) / 86400 * 86400 - 86400 ))
fi
day=$(day_of "$start")
next=$(day_of $((start + 86400)))
run_id="$name-$day"
report="$log_dir/$tag-$day.json"
log="$log_dir/$tag.log"

if [ -r "$env_file" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$env_file"
  set +a
fi

before=$( (wc -l < "$log") 2>/dev/null || echo 0)
(
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $run_id: start"
  [ -r "$env_file" ] || echo "=== no environment file $env_file (BACKFILL_ENV_FILE)"
  "${BACKFILL_BIN:-backfill}" run --job "$job" \
    --from "${day}T00:00:00Z" --to "${next}T00:00:00Z" \
    --run-id "$run_id" --report "$report" --fail-on-dlq --progress off
  code=$?
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $run_id: exit $code"
  exit $code
) >>"$log" 2>&1 </dev/null
code=$?

if [ "$code" -ne 0 ]; then
  case $code in
    1) why="runtime failure (store or broker); nothing committed unless the log says so: run again" ;;
    2) why="configuration error (job file, flags, environment, a run id committed with other settings)" ;;
    3) why="committed, and dead-lettered events: the DLQ needs a human (report: $report)" ;;
    4) why="another run on the same state won; nothing of this run is visible: run again" ;;
    *) why="killed or failed to start" ;;
  esac
  echo "backfill $run_id failed: exit $code, $why"
  echo "log ($log):"
  tail -n "+$((before + 1))" "$log"
fi
exit "$code"
