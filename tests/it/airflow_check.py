"""Checks jobs/airflow_backfill_dag.py against the installed Airflow 3,
without a scheduler or a metadata database (run by tests/it/schedulers.rs
with the venv's python):

1. the DagBag loads the file with no import error and no warning
   (a deprecated Airflow 2 import warns);
2. the timetable, as the scheduler sees it (the core timetable the DAG
   serializes to), gives a data interval with start < end, where a plain
   "@daily" schedule gives start == end;
3. each task's templates render, for that interval, to the command line
   the README documents;
4. the task callables map backfill's exit codes to task states: a fake
   `backfill` exits 0..4 and the raised exception is checked;
5. the same callables against the real binary and a real archive: exit 3
   under --fail-on-dlq, the report pushed to XCom, and a retry that exits 3
   again instead of turning green; the preflight passes.

Usage: python airflow_check.py DAG_FILE BACKFILL_BIN WORK_DIR
Prints one `ok:` line per check; any failure raises (non-zero exit).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

dag_file, backfill_bin, work = (Path(a) for a in sys.argv[1:4])
work.mkdir(parents=True, exist_ok=True)

import pendulum  # noqa: E402
from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402
from airflow.serialization.encoders import coerce_to_core_timetable  # noqa: E402
from airflow.timetables.base import TimeRestriction  # noqa: E402
from airflow.timetables.trigger import CronTriggerTimetable  # noqa: E402


def ok(msg: str) -> None:
    print(f"ok: {msg}", flush=True)


# 1. The DagBag: no import errors, no warnings (deprecated imports warn).
dags = work / "dags"
dags.mkdir(exist_ok=True)
shutil.copy(dag_file, dags / dag_file.name)
with warnings.catch_warnings():
    warnings.simplefilter("always")
    bag = DagBag(dag_folder=str(dags))
assert not bag.import_errors, f"import errors: {bag.import_errors}"
assert not bag.captured_warnings, f"warnings while importing: {bag.captured_warnings}"
dag = bag.dags["event_backfill"]
tasks = {t.task_id: t for t in dag.tasks}
assert set(tasks) == {"nightly.preflight", "nightly.run", "nightly.merge"}, tasks
module = sys.modules[tasks["nightly.preflight"].python_callable.__module__]
SHARDS = module.SHARDS
assert SHARDS > 1, SHARDS
assert tasks["nightly.preflight"] in tasks["nightly.run"].upstream_list
assert tasks["nightly.run"] in tasks["nightly.merge"].upstream_list
# The run is mapped over the shards; the merge runs after all of them,
# failed ones included (a shard that dead-letters has committed).
assert type(tasks["nightly.run"]).__name__ == "DecoratedMappedOperator", type(tasks["nightly.run"])
assert tasks["nightly.run"].op_kwargs_expand_input.value == {"shard": list(range(SHARDS))}
assert str(tasks["nightly.merge"].trigger_rule) in ("all_done", "TriggerRule.ALL_DONE"), tasks["nightly.merge"].trigger_rule
ok(f"DagBag loads {dag_file.name}: tasks {sorted(tasks)}, the run mapped over {SHARDS} shards, then merged")

# 2. The timetable the scheduler uses: a real window.
timetable = coerce_to_core_timetable(dag.timetable)
run_after = pendulum.datetime(2024, 1, 2, tz="UTC")
interval = timetable.infer_manual_data_interval(run_after=run_after)
assert interval.start < interval.end, interval
assert (interval.start, interval.end) == (
    pendulum.datetime(2024, 1, 1, tz="UTC"),
    pendulum.datetime(2024, 1, 2, tz="UTC"),
), interval
first = timetable.next_dagrun_info(
    last_automated_data_interval=None,
    restriction=TimeRestriction(earliest=dag.start_date, latest=None, catchup=True),
)
assert first.data_interval.start < first.data_interval.end, first
# What this guards against: Airflow 3's plain cron schedule.
plain = CronTriggerTimetable("@daily", timezone="UTC").infer_manual_data_interval(run_after=run_after)
assert plain.start == plain.end, plain
ok(f"timetable {type(timetable).__name__}: [{interval.start}, {interval.end}) (a plain @daily gives start == end)")

# 3. Templates rendered for that interval.
context = {
    "data_interval_start": interval.start,
    "data_interval_end": interval.end,
    "logical_date": interval.start,
    "ds": interval.start.strftime("%Y-%m-%d"),
    "ds_nodash": interval.start.strftime("%Y%m%d"),
    "dag": dag,
    "params": {},
}
job = str(work / "nightly.toml")
rendered = {}
for task_id in ("nightly.preflight", "nightly.run"):
    t = tasks[task_id]
    op_kwargs = t.partial_kwargs["op_kwargs"] if task_id == "nightly.run" else t.op_kwargs
    retries = t.partial_kwargs.get("retries", t.retries) if task_id == "nightly.run" else t.retries
    assert retries == 2, (task_id, retries)
    kwargs = {k: v for k, v in op_kwargs.items() if k != "job"}
    r = t.render_template(kwargs, context, jinja_env=dag.get_template_env())
    assert r == {
        "date_from": "2024-01-01T00:00:00+00:00",
        "date_to": "2024-01-02T00:00:00+00:00",
        "day": "20240101",
    }, (task_id, r)
    rendered[task_id] = {"job": job, **r}
merge_day = tasks["nightly.merge"].render_template(
    tasks["nightly.merge"].op_kwargs["day"], context, jinja_env=dag.get_template_env()
)
assert merge_day == "20240101", merge_day
argv = module.backfill_argv(report="/r.json", shard=2, **rendered["nightly.run"])
expected = [
    "backfill", "run", "--job", job,
    "--from", "2024-01-01T00:00:00+00:00", "--to", "2024-01-02T00:00:00+00:00",
    "--run-id", "nightly-20240101", "--report", "/r.json",
    "--fail-on-dlq", "--progress", "off",
]  # fmt: skip
assert argv == [*expected, "--shard", f"2/{SHARDS}"], argv
assert module.backfill_argv(report="/r.json", dry_run=True, shard=0, **rendered["nightly.preflight"]) == [
    *expected,
    "--shard",
    f"0/{SHARDS}",
    "--dry-run",
]
assert module.run_id_for(job, "20240101", 2) == f"nightly-20240101-shard-2-of-{SHARDS}"
ok("templates render: " + " ".join(argv))

# 3b. The env file is data: values are not run, a line that is not
# KEY=VALUE stops the task naming the line, never its text.
env_file = work / "backfill.env"
env_file.write_text(
    '# comment\n\nexport A="two words"\nB=$(touch /tmp/x);\r\nC=\'q\'\n'
)
assert module.read_env_file(str(env_file)) == {
    "A": "two words",
    "B": "$(touch /tmp/x);",
    "C": "q",
}, module.read_env_file(str(env_file))
env_file.write_text("A=1\nhunter2-password\n")
try:
    module.read_env_file(str(env_file))
    raise AssertionError("a line without = was accepted")
except AirflowFailException as e:
    assert "line 2" in str(e) and "hunter2" not in str(e), str(e)
assert module.read_env_file(str(work / "absent.env")) == {}
ok("the env file is read as data; a line that is not KEY=VALUE is named by number")

# 4. Exit codes to task states, against a fake backfill.
pushed: list = []
module.push_report = pushed.append
fake = work / "fake-backfill"
fake.write_text(
    "#!/bin/sh\n"
    'while [ $# -gt 0 ]; do [ "$1" = --report ] && printf \'{"exit":%s}\' "$FAKE_EXIT" > "$2"; shift; done\n'
    'echo "error: fake failure $FAKE_EXIT" >&2\n'
    'exit "$FAKE_EXIT"\n'
)
fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
os.environ["BACKFILL_BIN"] = str(fake)
os.environ["BACKFILL_ENV_FILE"] = str(work / "absent.env")


def call(task_id: str, shard: int = 0):
    """The task's callable with its rendered arguments (a shard's for the run)."""
    if task_id == "nightly.run":
        return tasks[task_id].python_callable(**rendered[task_id], shard=shard)
    return tasks[task_id].python_callable(**rendered[task_id])


def outcome(task_id: str, code: int) -> str:
    os.environ["FAKE_EXIT"] = str(code)
    pushed.clear()
    try:
        call(task_id)
    except AirflowFailException:
        result = "failed, not retried"
    except AirflowException:
        result = "failed, retried"
    else:
        result = "success"
    assert pushed == [{"exit": code}], (task_id, code, pushed)
    return result


states = {code: outcome("nightly.run", code) for code in range(5)}
assert states == {
    0: "success",
    1: "failed, retried",
    2: "failed, not retried",
    3: "failed, not retried",
    4: "failed, retried",
}, states
assert issubclass(AirflowFailException, AirflowException)
pre = {code: outcome("nightly.preflight", code) for code in range(5)}
assert pre == {**states, 3: "success"}, pre
ok(f"exit codes -> run: {states}; preflight: 3 -> {pre[3]}")

# 5. The real binary on a real archive: exit 3, report in XCom, retry 3.
archive = work / "archive"
subprocess.run(
    [str(backfill_bin), "generate", "--out", str(archive), "--events", "2000",
     "--keys", "20", "--seed", "3", "--days", "2", "--start", "2024-01-01"],
    check=True, capture_output=True,
)  # fmt: skip
Path(job).write_text(f'source = "{archive}"\nout = "${{BACKFILL_TEST_OUT}}"\n')
(work / "backfill.env").write_text(f"# shared with jobs/crontab\nexport BACKFILL_TEST_OUT='{work / 'out'}'\n")
os.environ["BACKFILL_ENV_FILE"] = str(work / "backfill.env")
os.environ["BACKFILL_BIN"] = str(backfill_bin)


def real(task_id: str, shard: int = 0) -> str:
    pushed.clear()
    try:
        call(task_id, shard)
        return "success"
    except AirflowFailException as e:
        return f"failed, not retried: {e}"


assert real("nightly.preflight") == "success"
assert pushed and pushed[0]["dry_run"] is True, pushed
reports, first_tries = [], []
for shard in range(SHARDS):
    first_tries.append(real("nightly.run", shard))
    reports.append(pushed[0])
# Every shard that dead-letters exits 3; the whole run dead-letters.
assert any(t.startswith("failed, not retried") and "exit 3" in t for t in first_tries), first_tries
for shard, (t, report) in enumerate(zip(first_tries, reports)):
    assert report["run_id"] == f"nightly-20240101-shard-{shard}-of-{SHARDS}", report
    assert report["shard"] == {"index": shard, "count": SHARDS}, report
    assert report["exit_code"] == (3 if report["dead_lettered"] else 0), (t, report)
    assert (t == "success") == (report["dead_lettered"] == 0), (t, report)
retry = real("nightly.run", 0)
assert pushed[0]["already_committed"] is True and pushed[0]["exit_code"] == reports[0]["exit_code"], pushed
# A cleared DAG run: the preflight (shard 0's dry run) finds shard 0
# committed and passes.
assert real("nightly.preflight") == "success"
assert pushed[0]["already_committed"] is True, pushed
merged = module.merge_reports(job, "20240101", reports)
assert merged["run_id"] == "nightly-20240101", merged
assert merged["events"] == sum(r["events"] for r in reports) > 0, merged
assert merged["dead_lettered"] > 0 and len(merged["merged_from"]) == SHARDS, merged
# The merge fails the DAG run: a shard without a report, a broken balance.
try:
    module.merge_reports(job, "20240101", [reports[0], None, *reports[2:]])
    raise AssertionError("a missing shard report was merged")
except AirflowFailException as e:
    assert f"no report from shard 1/{SHARDS}" in str(e), str(e)
broken = [dict(r) for r in reports]
broken[1]["replayed"] += 1
try:
    module.merge_reports(job, "20240101", broken)
    raise AssertionError("an unbalanced report was merged")
except AirflowFailException as e:
    assert "exit 1" in str(e) and "does not balance" in str(e), str(e)
# The merge task itself pulls each shard's report from XCom by map index.
class FakeTI:
    def xcom_pull(self, task_ids, key, map_indexes):
        assert (task_ids, key) == ("nightly.run", "report"), (task_ids, key)
        return reports[map_indexes]


module.get_current_context = lambda: {"ti": FakeTI()}
merge_task = tasks["nightly.merge"]
via_task = merge_task.python_callable(**{**merge_task.op_kwargs, "day": "20240101"})
assert via_task == merged, via_task
exit3 = sum("exit 3" in t for t in first_tries)
ok(
    f"real backfill in {SHARDS} shards ({exit3} dead-lettered: exit 3), a retry returns the committed outcome; "
    f"the merge task sums {merged['events']} events, {merged['dead_lettered']} dead-lettered; "
    "a missing or unbalanced shard fails it"
)
