"""Airflow 3 DAG: one backfill per job file and per day, in SHARDS runs.

What it does, per data interval [data_interval_start, data_interval_end),
in a task group per job file (named after the file: ``nightly``):

- ``nightly.preflight``: ``backfill run --dry-run`` with the very flags of
  the first shard's run (a configuration error fails here, before anything
  is written);
- ``nightly.run``: the run, mapped over the shards
  (``run.partial(...).expand(shard=range(SHARDS))``): ``backfill run --shard
  I/SHARDS``, each shard's JSON report (the ``--report`` file, read back)
  pushed to XCom under ``report`` (and returned, on success);
- ``nightly.merge``: once every shard has ended, ``backfill report merge``
  over their reports: it fails the DAG run when a shard left no report or
  the shards' figures do not balance, and returns the merged report.

With ``SHARDS = 1`` each job is one run without ``--shard`` and no merge.
(Airflow cannot expand a task inside a mapped task group, so the groups are
made per job file when the DAG file is parsed.)

The run id is the job file's name and the interval's first day
(``nightly-20261130``; a shard's is ``nightly-20261130-shard-2-of-4``): a
retried or cleared task reruns the same id, and ``backfill`` exits with the
committed run's outcome without writing anything (docs/scheduling.md).

Exit codes become task states (README, "Exit codes"):

==== ============================================== ===========================
code meaning                                        task
==== ============================================== ===========================
0    committed (or already committed and it was 0)  success
1    runtime failure (store, broker): nothing       failed, retried
     committed, or committed and not yet published
2    configuration error (job file, flags, a run    failed, never retried
     id committed with other settings)
3    committed, dead letters under --fail-on-dlq;   failed, never retried: a
     a rerun of the run id exits 3 again            human looks at the DLQ
4    another run on the same state won; nothing     failed, retried (the retry
     visible                                        decides afresh)
==== ============================================== ===========================

Exit 2 and 3 raise ``AirflowFailException``, which Airflow never retries;
1 and 4 raise ``AirflowException``, retried ``retries`` times.

Needs Airflow 3 (``airflow.sdk``, the standard provider); docs/scheduling.md
has the changes for Airflow 2.x. The test suite loads this file into a real
Airflow 3 (tests/it/schedulers.rs).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, TaskGroup, get_current_context, task

try:  # Airflow >= 3.1: the Task SDK's own exceptions
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowException, AirflowFailException

log = logging.getLogger(__name__)

#: One mapped task per job file. Each job must have a state of its own
#: (``out`` or ``state`` in the file): the run ids of two job files differ,
#: but two jobs on one state would race for the same events.
JOB_FILES = [
    "/opt/backfill/jobs/nightly.toml",
]

#: Runs per job and day: ``backfill run --shard I/SHARDS`` for I in
#: 0..SHARDS-1, side by side, each deciding the events of its keys
#: (docs/scheduling.md, "Shards"). 1: one run, no merge.
SHARDS = 4

#: The binary, found on the worker's PATH unless BACKFILL_BIN names it.
BACKFILL_BIN_DEFAULT = "backfill"

#: KEY=VALUE lines (``export`` and quotes allowed, ``#`` comments) added to
#: the run's environment, shared with jobs/crontab: the variables the job
#: files expand (``${LAKE_BUCKET}``) and the store's credentials. Keep it
#: readable by the worker's user only.
ENV_FILE_DEFAULT = "/etc/backfill/backfill.env"

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_DLQ, EXIT_CONFLICT = 0, 1, 2, 3, 4

#: The window as Airflow renders it: ``ts`` gives ISO 8601 with a ``T``
#: (a bare ``{{ data_interval_start }}`` renders with a space in Airflow 3).
WINDOW = {
    "date_from": "{{ data_interval_start | ts }}",
    "date_to": "{{ data_interval_end | ts }}",
    "day": "{{ data_interval_start | ds_nodash }}",
}


def run_id_for(job: str, day: str, shard: int | None = None) -> str:
    """The run id of a job file for one day (a shard's with the suffix
    backfill adds): stable across retries."""
    base = f"{Path(job).stem}-{day}"
    return base if shard is None else f"{base}-shard-{shard}-of-{SHARDS}"


def group_id_for(job: str) -> str:
    """The task group of a job file: its name, in the characters a task
    group id may hold."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(job).stem) or "job"


def backfill_argv(
    job: str,
    date_from: str,
    date_to: str,
    day: str,
    report: str,
    dry_run: bool = False,
    shard: int | None = None,
) -> list[str]:
    """The command line of one run (the preflight adds ``--dry-run``, a
    shard ``--shard I/SHARDS``)."""
    argv = [
        os.environ.get("BACKFILL_BIN", BACKFILL_BIN_DEFAULT),
        "run",
        "--job",
        job,
        "--from",
        date_from,
        "--to",
        date_to,
        "--run-id",
        run_id_for(job, day),
        "--report",
        report,
        "--fail-on-dlq",
        "--progress",
        "off",
    ]
    if shard is not None:
        argv += ["--shard", f"{shard}/{SHARDS}"]
    if dry_run:
        argv.append("--dry-run")
    return argv


def read_env_file(path: str) -> dict[str, str]:
    """The variables of an env file, read as data as backfill-cron.sh reads
    it: KEY=VALUE lines, comments, blank lines, ``export `` and one pair of
    quotes; nothing expanded. Any other line stops the task naming the file
    and the line number, never the line (it may hold a password). None if
    the file is absent."""
    env: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return env
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise AirflowFailException(
                f"{path}: line {number} is not KEY=VALUE (a comment starts with #)"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def raise_for_exit(code: int, run_id: str, last_line: str, dry_run: bool = False) -> None:
    """Map backfill's exit code to the task's state: return for success,
    AirflowFailException (never retried) for 2 and 3, AirflowException
    (retried) for 1, 4 and a kill."""
    what = f"backfill {'--dry-run ' if dry_run else ''}{run_id}"
    if code == EXIT_OK:
        return
    if code == EXIT_USAGE:
        raise AirflowFailException(
            f"{what}: exit 2, configuration error (not retried: fix the job file or flags): {last_line}"
        )
    if code == EXIT_DLQ:
        raise AirflowFailException(
            f"{what}: exit 3, the run is committed and dead-lettered events under --fail-on-dlq; "
            "the DLQ needs a human (a retry exits 3 again)"
        )
    if code == EXIT_CONFLICT:
        raise AirflowException(
            f"{what}: exit 4, another run on the same state won; nothing of this one is visible (retried): {last_line}"
        )
    raise AirflowException(f"{what}: exit {code} (retried): {last_line}")


def push_report(report: dict) -> None:
    """The report to XCom under ``report``, whatever the exit code."""
    get_current_context()["ti"].xcom_push(key="report", value=report)


def backfill_env() -> dict[str, str]:
    """The runs' environment: the worker's and the env file's."""
    return {**os.environ, **read_env_file(os.environ.get("BACKFILL_ENV_FILE", ENV_FILE_DEFAULT))}


def run_backfill(
    job: str,
    date_from: str,
    date_to: str,
    day: str,
    dry_run: bool = False,
    shard: int | None = None,
) -> dict | None:
    """Run backfill once, log its output, push its report, and map its exit
    code to the task's state (``raise_for_exit``)."""
    env = backfill_env()
    with tempfile.TemporaryDirectory(prefix="backfill-report-") as tmp:
        report_file = os.path.join(tmp, "report.json")
        argv = backfill_argv(job, date_from, date_to, day, report_file, dry_run, shard)
        log.info("running %s", " ".join(argv))
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            log.info("%s", line)
        for line in done.stderr.splitlines():
            log.warning("%s", line)
        report = None
        if os.path.exists(report_file):
            with open(report_file) as f:
                report = json.load(f)
    if report is not None:
        push_report(report)
    code = done.returncode
    if dry_run and code == EXIT_DLQ:
        # A dry run under --fail-on-dlq exits 3 when the run would
        # dead-letter (or its id is committed and exited 3): not a reason
        # to stop the run, which reports it itself.
        log.warning("backfill --dry-run: the run would dead-letter events (exit 3)")
        code = EXIT_OK
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    raise_for_exit(code, run_id_for(job, day, shard), lines[-1] if lines else "", dry_run)
    return report


def merge_reports(job: str, day: str, reports: list[dict | None]) -> dict:
    """``backfill report merge`` over the shards' reports (in shard order,
    None for a shard that wrote none): the merged report, or the task fails
    (not retried: a retry would merge the same reports) when a shard left
    no report (it failed before its commit: retry that shard) or the
    figures do not balance."""
    missing = [i for i, r in enumerate(reports) if r is None]
    if missing:
        raise AirflowFailException(
            f"{run_id_for(job, day)}: no report from shard {', '.join(f'{i}/{SHARDS}' for i in missing)}: "
            "clear its run task; the merge runs again when it has ended"
        )
    with tempfile.TemporaryDirectory(prefix="backfill-merge-") as tmp:
        files = []
        for i, r in enumerate(reports):
            path = os.path.join(tmp, f"shard-{i}.json")
            with open(path, "w") as f:
                json.dump(r, f)
            files.append(path)
        argv = [os.environ.get("BACKFILL_BIN", BACKFILL_BIN_DEFAULT), "report", "merge", "--json", *files]
        log.info("running %s", " ".join(argv))
        done = subprocess.run(argv, env=backfill_env(), capture_output=True, text=True, check=False)
    for line in done.stderr.splitlines():
        log.warning("%s", line)
    if done.returncode != EXIT_OK:
        lines = [l for l in done.stderr.splitlines() if l.strip()]
        raise AirflowFailException(
            f"backfill report merge {run_id_for(job, day)}: exit {done.returncode}: {lines[-1] if lines else ''}"
        )
    merged = json.loads(done.stdout)
    log.info(
        "%s: %s events = %s resolved + %s replayed + %s dead-lettered + %s already in the DLQ",
        merged["run_id"],
        merged["events"],
        merged["resolved"],
        merged["replayed"],
        merged["dead_lettered"],
        merged["skipped_dead_lettered"],
    )
    return merged


with DAG(
    dag_id="event_backfill",
    # A data interval from one midnight (UTC) to the next: the run starts
    # when the interval has ended. A plain cron schedule (`"@daily"`) in
    # Airflow 3 is a CronTriggerTimetable, whose data interval is empty
    # (start == end), and `--from X --to X` exits 2.
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=10),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(hours=6),
    },
    tags=["backfill"],
) as dag:

    @task
    def preflight(job: str, date_from: str, date_to: str, day: str) -> dict | None:
        """The run's flags with --dry-run: decide and report, write nothing.
        Sharded, as shard 0: a run id keeps its split, so an unsharded dry
        run of a backfill whose shards are committed (a cleared DAG run)
        would exit 2."""
        return run_backfill(job, date_from, date_to, day, dry_run=True, shard=0 if SHARDS > 1 else None)

    @task
    def run(job: str, date_from: str, date_to: str, day: str, shard: int | None = None) -> dict | None:
        """One shard's run (the whole window's with SHARDS = 1): its report
        to XCom, its exit code to the task's state."""
        return run_backfill(job, date_from, date_to, day, shard=shard)

    # After every shard, whatever their states: a shard that dead-letters
    # (exit 3) has committed, and the balance is still worth checking.
    @task(trigger_rule="all_done", retries=0)
    def merge(job: str, day: str, group: str) -> dict:
        """The shards' reports, from XCom, merged (``merge_reports``)."""
        ti = get_current_context()["ti"]
        # One pull per shard: a list pull leaves out the shards without a
        # report, and the rest would shift.
        reports = [
            ti.xcom_pull(task_ids=f"{group}.run", key="report", map_indexes=i) for i in range(SHARDS)
        ]
        return merge_reports(job, day, reports)

    for job in JOB_FILES:
        # A group per job file, so that one job's failing preflight holds
        # back that job's runs only.
        group = group_id_for(job)
        with TaskGroup(group_id=group):
            checked = preflight(job=job, **WINDOW)
            if SHARDS == 1:
                checked >> run(job=job, **WINDOW)
            else:
                runs = run.partial(job=job, **WINDOW).expand(shard=list(range(SHARDS)))
                checked >> runs >> merge(job=job, day=WINDOW["day"], group=group)
