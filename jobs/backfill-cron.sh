#!/bin/sh
# backfill-cron.sh JOB_FILE: one job's run over yesterday (UTC), for cron
# (jobs/crontab; docs/scheduling.md).
#
# Cron mails whatever a job prints. This prints nothing when the run
# succeeds: the run's output goes to the log file, and only a non-zero exit
# prints (a line saying what it means, then this run's part of the log), so
# only failures and dead letters (exit 3, --fail-on-dlq) page.
#
# - files named after the job: its base name (in backfill's run id alphabet)
#   and the CRC (cksum) of its absolute path, so that a/nightly.toml and
#   b/nightly.toml have a lock, a log and reports each: NAME-CRC.lock,
#   NAME-CRC.log, NAME-CRC-DAY.json;
# - a lock (flock(1), or perl's flock where there is no flock(1), as on
#   macOS): a second invocation while a run of the same job still holds it
#   prints that and exits 75, running nothing. The kernel drops the lock
#   when its holders die, kill -9 included: a lock is never stale;
# - the run's environment comes from BACKFILL_ENV_FILE, read as data: KEY=VALUE
#   lines, `#` comments, blank lines, an optional `export `, one pair of
#   quotes around a value; nothing in it is expanded or run. A line that is
#   none of these stops the script (exit 2) naming the file and the line,
#   never its text (it may hold a secret);
# - the window is [yesterday, today) in UTC, or [BACKFILL_DAY, +1 day): the
#   run id and the report are named after that day (nightly-2026-11-30), so
#   a rerun the same day is a retry. A BACKFILL_DAY that has not ended is
#   refused: its run would commit part of a day under the id of the whole;
# - dates by calendar arithmetic in the shell: of `date` only
#   `date -u +%s` is asked (GNU, BSD, busybox), nothing that differs.
#
# Exit: backfill's own code (0 quiet; 1 and 4 retry; 2 configuration; 3
# dead letters), 2 for this script's own settings (its arguments, the env
# file, BACKFILL_DAY, the log folder), 75 when another run holds the lock.
#
# Env, read from cron's environment (the crontab), not from the env file:
# BACKFILL_ENV_FILE (/etc/backfill/backfill.env), BACKFILL_LOG_DIR
# (/var/log/backfill), BACKFILL_DAY (YYYY-MM-DD: another day than
# yesterday, e.g. to catch up), BACKFILL_BIN (backfill, from PATH).
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 JOB_FILE" >&2
  exit 2
fi
job=$1
log_dir=${BACKFILL_LOG_DIR:-/var/log/backfill}
env_file=${BACKFILL_ENV_FILE:-/etc/backfill/backfill.env}
bin=${BACKFILL_BIN:-backfill}
label=backfill-cron.sh

# What cron mails: one line saying why, on stdout, and into the log once
# there is one; then exit with CODE.
fail() {
  code=$1
  shift
  echo "$label failed: exit $code, $*"
  if [ -n "${log:-}" ]; then
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $label failed: exit $code, $*" >>"$log" 2>/dev/null
  fi
  exit "$code"
}

case $job in
  *://*)
    # backfill reads a local file; a URL may carry credentials: not shown.
    fail 2 "the job file must be a local path, not a URL (not shown: it may hold credentials)" ;;
  */ | '')
    fail 2 "the job file argument names a folder, not a file" ;;
esac
case $bin in
  *=*) fail 2 "BACKFILL_BIN must not contain '=' (env would read it as a variable)" ;;
esac

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

# The base name in the run id alphabet (letters, digits, '.', '_', '-',
# starting with a letter or digit; backfill refuses other run ids).
name=$(printf '%s' "${base%.toml}" | LC_ALL=C tr -c 'A-Za-z0-9._-' '_' | cut -c 1-100)
case $name in
  [A-Za-z0-9]*) ;;
  *) name=job$name ;;
esac
crc=$(printf '%s' "$job" | cksum)
tag=$name-$(printf '%08x' "${crc%% *}")
label="backfill $name"

case $log_dir in
  /*) ;;
  *) log_dir=$(pwd -P)/$log_dir ;;
esac
lock=$log_dir/$tag.lock
if ! err=$(mkdir -p -- "$log_dir" 2>&1); then
  fail 2 "cannot create the log folder $log_dir (BACKFILL_LOG_DIR): ${err##*: }"
fi
for f in "$lock" "$log_dir/$tag.log"; do
  if ! ( : >>"$f" ) 2>/dev/null; then
    fail 2 "cannot write $f (BACKFILL_LOG_DIR): the folder or the file is not writable"
  fi
done
log=$log_dir/$tag.log

# Held until this script exits (fd 9 stays open in the backfill it runs, so
# a run outliving a killed script still holds it).
exec 9>>"$lock"
if command -v flock >/dev/null 2>&1; then
  err=$(flock -n 9 2>&1)
  held=$?
elif command -v perl >/dev/null 2>&1; then
  # flock(2) on fd 9 itself: the lock belongs to the open file, which this
  # shell keeps open after perl exits.
  err=$(perl -MFcntl=:flock -e 'open(my $fh, ">&=", 9) or die "fd 9: $!\n";
    flock($fh, LOCK_EX | LOCK_NB) and exit 0; $!{EWOULDBLOCK} and exit 1; die "$!\n"' 2>&1)
  held=$?
else
  err="neither flock(1) nor perl is on PATH"
  held=2
fi
case $held in
  0) ;;
  1)
    echo "backfill $name: skipped: a run of this job still holds $lock"
    exit 75 ;;
  *) fail 2 "cannot lock $lock: $err" ;;
esac

# Calendar arithmetic (Howard Hinnant's civil-days algorithms), so that no
# date(1) extension is needed. Days count from 1970-01-01; years >= 1970.
days_of() { # YEAR MONTH DAY -> $days
  _y=$(($1 - ($2 <= 2)))
  _doy=$(((153 * ($2 + ($2 > 2 ? -3 : 9)) + 2) / 5 + $3 - 1))
  _yoe=$((_y % 400))
  days=$(((_y / 400) * 146097 + _yoe * 365 + _yoe / 4 - _yoe / 100 + _doy - 719468))
}
civil_of() { # DAYS -> $civil (YYYY-MM-DD)
  _z=$(($1 + 719468))
  _doe=$((_z % 146097))
  _yoe=$(((_doe - _doe / 1460 + _doe / 36524 - _doe / 146096) / 365))
  _doy=$((_doe - (365 * _yoe + _yoe / 4 - _yoe / 100)))
  _mp=$(((5 * _doy + 2) / 153))
  _m=$((_mp + (_mp < 10 ? 3 : -9)))
  civil=$(printf '%04d-%02d-%02d' $((_z / 146097 * 400 + _yoe + (_m <= 2))) "$_m" \
    $((_doy - (153 * _mp + 2) / 5 + 1)))
}

now=$(date -u +%s 2>/dev/null)
case $now in
  '' | *[!0-9]*) now=$(perl -e 'print time' 2>/dev/null) ;;
esac
case $now in
  '' | *[!0-9]*) fail 2 "cannot read the clock: date -u +%s gave no number of seconds" ;;
esac
today=$((now / 86400))
if [ -n "${BACKFILL_DAY:-}" ]; then
  case $BACKFILL_DAY in
    19[7-9][0-9]-[0-9][0-9]-[0-9][0-9] | [2-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]) ;;
    *) fail 2 "BACKFILL_DAY=$BACKFILL_DAY is not a day (YYYY-MM-DD, 1970 or later)" ;;
  esac
  # Leading zeros dropped: 08 is not octal here.
  _mm=${BACKFILL_DAY#*-}
  _dd=${_mm#*-}
  _mm=${_mm%-*}
  days_of "${BACKFILL_DAY%%-*}" "${_mm#0}" "${_dd#0}"
  civil_of "$days"
  if [ "$civil" != "$BACKFILL_DAY" ]; then
    fail 2 "BACKFILL_DAY=$BACKFILL_DAY is not a day (YYYY-MM-DD, 1970 or later)"
  fi
  if [ "$days" -ge "$today" ]; then
    fail 2 "BACKFILL_DAY=$BACKFILL_DAY has not ended (UTC): a run now would commit part of the day under the day's run id"
  fi
  start=$days
else
  start=$((today - 1))
fi
civil_of "$start"
day=$civil
civil_of $((start + 1))
next=$civil
run_id=$name-$day
report=$log_dir/$tag-$day.json
label="backfill $run_id"

# The environment file, as data: each valid line becomes one KEY=VALUE
# argument of env(1), kept in "$@" (the job argument was read above), so
# that no key can change this script's own variables either. (`${1+"$@"}`:
# bash 3.2, macOS's sh, calls an empty "$@" unbound under set -u.)
set --
env_note=
if [ -e "$env_file" ]; then
  if ! [ -f "$env_file" ] || ! [ -r "$env_file" ]; then
    fail 2 "cannot read the environment file $env_file (BACKFILL_ENV_FILE)"
  fi
  n=0
  cr=$(printf '\r')
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%"$cr"}
    # Blanks around the line, and the `export ` of a shell-style file.
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    case $line in
      '' | '#'*) continue ;;
      export[[:space:]]*)
        line=${line#export}
        line=${line#"${line%%[![:space:]]*}"} ;;
    esac
    bad="the environment file $env_file (BACKFILL_ENV_FILE), line $n:"
    hidden="(the line is not shown: it may hold a secret)"
    case $line in
      *=*) ;;
      *) fail 2 "$bad not KEY=VALUE $hidden" ;;
    esac
    key=${line%%=*}
    key=${key%"${key##*[![:space:]]}"}
    value=${line#*=}
    value=${value#"${value%%[![:space:]]*}"}
    case $key in
      '' | [0-9]* | *[!A-Za-z0-9_]*)
        fail 2 "$bad the name before '=' is not a variable name (letters, digits, '_') $hidden" ;;
    esac
    case $value in
      \"*\" | \'*\')
        value=${value#?}
        value=${value%?} ;;
      \"* | \'*)
        fail 2 "$bad the value opens a quote it does not close $hidden" ;;
    esac
    set -- "$@" "$key=$value"
  done <"$env_file"
else
  env_note="=== no environment file $env_file (BACKFILL_ENV_FILE)"
fi

before=$(wc -c <"$log" | tr -d ' ')
(
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $run_id: start"
  [ -z "$env_note" ] || echo "$env_note"
  env ${1+"$@"} "$bin" run --job "$job" \
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
    126 | 127) why="$bin could not be run (BACKFILL_BIN, PATH)" ;;
    129 | 1[3-9][0-9]) why="killed by signal $((code - 128)) (9: kill -9, or the out-of-memory killer)" ;;
    *) why="killed or failed to start" ;;
  esac
  echo "backfill $run_id failed: exit $code, $why"
  echo "log ($log):"
  tail -c "+$((before + 1))" "$log"
fi
exit "$code"
