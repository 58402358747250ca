#!/usr/bin/env bash
# Installs Apache Airflow 3 (pinned) from PyPI into a venv in the cache
# outside the clone, for the scheduler test (tests/it/schedulers.rs) that
# loads jobs/airflow_backfill_dag.py into a real Airflow. Idempotent: a venv
# holding the pinned version (same python, same constraints) is reused, so a
# warm machine pays nothing; a half-finished install (no stamp) is redone.
#
# The dependencies are pinned by scripts/airflow-constraints-<py>.txt, the
# `pip freeze` of a venv installed at this version (Airflow's own constraints
# files live outside PyPI); for another python version pip resolves them
# afresh. Takes about a minute cold (measured: docs/scheduling.md).
#
# Usage: scripts/install-airflow.sh      prints the venv's python on success
# Env:   BACKFILL_CACHE (default ~/.cache/event-backfill), PYTHON (python3),
#        AIRFLOW_CONSTRAINTS=none to resolve without the constraints file.
set -euo pipefail

AIRFLOW_VERSION="3.3.2"
CACHE="${BACKFILL_CACHE:-$HOME/.cache/event-backfill}"
VENV="$CACHE/airflow-venv"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"

mkdir -p "$CACHE"
# One installer at a time (`make tools` and a test process may both call it).
exec 9>"$CACHE/airflow-venv.lock"
flock 9

py_version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
constraints="$HERE/airflow-constraints-$py_version.txt"
constraint_args=()
if [ "${AIRFLOW_CONSTRAINTS:-}" != "none" ] && [ -f "$constraints" ]; then
  constraint_args=(--constraint "$constraints")
  constraints_id="$(cksum < "$constraints" | cut -d' ' -f1)"
else
  constraints_id="none"
fi
want="apache-airflow==$AIRFLOW_VERSION python=$py_version constraints=$constraints_id"
stamp="$VENV/.backfill-stamp"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "airflow $AIRFLOW_VERSION: cached at $VENV" >&2
  echo "$VENV/bin/python"
  exit 0
fi

echo "installing apache-airflow $AIRFLOW_VERSION (python $py_version) into $VENV (about a minute)" >&2
start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "apache-airflow==$AIRFLOW_VERSION" ${constraint_args[@]+"${constraint_args[@]}"} >&2
# The imports the DAG and its check use, before the venv counts as installed.
home="$(mktemp -d)"
AIRFLOW_HOME="$home" "$VENV/bin/python" -c \
  'import airflow.sdk, airflow.providers.standard, airflow.dag_processing.dagbag' >&2
rm -rf "$home"
echo "$want" > "$stamp"
echo "airflow $AIRFLOW_VERSION: installed at $VENV in $(( $(date +%s) - start )) s" >&2
echo "$VENV/bin/python"
