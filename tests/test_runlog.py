"""The reader of events.jsonl: robust to what a live or newer daemon writes, one run at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from supervisord_ft import runlog
from supervisord_ft.errors import ReaderError

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def ev(t: float, event: str, run_id: str | None = "r1", **fields) -> str:
    stamp = (T0 + timedelta(seconds=t)).isoformat().replace("+00:00", "Z")
    head = {"timestamp": stamp, "level": "info", "event": event}
    return json.dumps({**head, **({"run_id": run_id} if run_id else {}), **fields})


def step(t: float, rank: int, n: int, attempt: int, run_id: str = "r1") -> str:
    return ev(t, "worker_output", run_id, rank=rank, restart=attempt, attempt=attempt,
              stream="stdout", worker_event="step", step=n, loss=1.0 / n)


def crash_run(run_id: str = "r1") -> list[str]:
    """Two ranks; rank 1 dies after step 7 of attempt 0; attempt 1 resumes from step 5."""
    lines = [ev(0, "supervisor_start", run_id, pid=1, host="elsewhere.example",
                config={"epochs": 2, "steps": 10, "command": None}),
             ev(0.1, "launching", run_id, restart=0, attempt=0, resume_from=None)]
    lines += [step(1 + n / 10, r, n, 0, run_id) for n in range(1, 8) for r in (0, 1)]
    lines += [ev(1.55, "worker_output", run_id, rank=1, attempt=0, worker_event="checkpoint_saved",
                 step=5, path="/ck/checkpoint_step_5.pt"),
              ev(1.8, "worker_output", run_id, rank=1, attempt=0, stream="stderr", line="boom"),
              ev(2.0, "worker_exited", run_id, rank=1, attempt=0, returncode=1),
              ev(2.001, "state_changed", run_id, **{"from": "RUNNING", "to": "RECOVERING"},
                 attempt=0, reason="rank 1 exited with 1"),
              ev(2.1, "worker_exited", run_id, rank=0, attempt=0, returncode=-15),
              ev(2.1, "teardown", run_id, why="recovery", attempt=0, seconds=0.099),
              ev(2.2, "checkpoint_selected", run_id, path="/ck/checkpoint_step_5.pt", step=5),
              ev(2.3, "launching", run_id, restart=1, attempt=1, resume_from="/ck/checkpoint_step_5.pt")]
    lines += [step(3 + n / 10, r, n, 1, run_id) for n in range(6, 21) for r in (0, 1)]
    return lines + [ev(5, "supervisor_exit", run_id, state="DONE", restarts=1, attempts=2,
                       exit_code=0)]


STACKS = "/srv/run/diagnoses/r1/attempt-0"
SUMMARY = "rank 1 at job.py:7 in spin_forever, outside any collective; ranks 0, 2 wait in all_reduce #101"


def hang_run(run_id: str = "r1", **diagnosed) -> list[str]:
    """Three ranks; attempt 0 hangs at 100 s: rank 0 silent longest, but the diagnosis blames
    rank 1 (the laggard, outside the collective the others wait in); attempt 1 runs to the end.
    ``diagnosed`` replaces fields of the ``hang_diagnosed`` event (None removes one)."""
    lines = [ev(0, "supervisor_start", run_id, pid=1, host="elsewhere.example",
                config={"command": ["python", "job.py"], "hang_timeout": 600.0}),
             ev(0.1, "launching", run_id, restart=0, attempt=0, resume_from=None)]
    lines += [step(1 + n, r, n, 0, run_id) for n in range(1, 5) for r in (0, 1, 2)]
    lines += [ev(4.5, "worker_output", run_id, rank=0, attempt=0, stream="stderr", line="rank 0 waits"),
              ev(5.5, "worker_output", run_id, rank=1, attempt=0, stream="stderr", line="rank 1 spins")]
    lines += [ev(100, "hang_detected", run_id, rank=r, restart=0, attempt=0, silent_for=silent,
                 before_first_step=False, timeout=90.0)
              for r, silent in ((0, 95.5), (1, 94.5), (2, 94.0))]
    fields = {"attempt": 0, "laggards": [1], "summary": SUMMARY, "stacks": STACKS,
              "frames": {"1": ["job.py:7 in spin_forever", "job.py:13 in <module>"]},
              "unanswered": {}, "seconds": 0.013, **diagnosed}
    lines += [ev(100.02, "hang_diagnosed", run_id, **{k: v for k, v in fields.items() if v is not None}),
              ev(100.03, "state_changed", run_id, **{"from": "RUNNING", "to": "RECOVERING"},
                 restart=0, attempt=0, reason="rank 1 hung: no sign of progress for 94.5 s"),
              ev(102, "teardown", run_id, why="recovery", attempt=0, seconds=1.97),
              ev(102.1, "launching", run_id, restart=1, attempt=1, resume_from=None)]
    lines += [step(103 + n, r, n, 1, run_id) for n in range(1, 9) for r in (0, 1, 2)]
    return lines + [ev(120, "supervisor_exit", run_id, state="DONE", restarts=1, attempts=2,
                       exit_code=0)]


def write(tmp_path, lines: list[str], tail: str = "") -> None:
    (tmp_path / runlog.EVENTS_FILE).write_text("\n".join(lines) + "\n" + tail)


def test_a_crash_and_its_recovery_are_summarised(tmp_path):
    write(tmp_path, crash_run())
    run = runlog.summarise(runlog.read(tmp_path))
    assert (run.run_id, run.state, run.daemon, run.exit_code) == ("r1", "DONE", "exited", 0)
    assert (run.step, run.total_steps, run.restarts) == (20, 20, 1)
    first, second = run.attempts
    assert (first.cause, first.failed_rank, first.last_stderr) == ("rank 1 exited with 1", 1, "boom")
    assert first.failed_at == pytest.approx(2.0) and first.detected_at == pytest.approx(2.001)
    assert first.teardown_seconds == 0.099 and first.relaunched_at == pytest.approx(2.3)
    assert first.steps_redone == 2  # reached 7, resumed from 5
    assert first.downtime == pytest.approx(3.6 - 2.0)
    assert (second.resumed_step, second.cause, second.steps_redone) == (5, None, None)
    assert run.checkpoint.step == 5
    assert run.last_failure["reason"] == "rank 1 exited with 1"
    g = run.goodput
    assert g.useful_steps == 20 and g.wall_seconds == pytest.approx(4.9)
    assert g.fault_free_steps_per_second == pytest.approx(10.0)  # one step per 0.1 s when healthy
    assert g.steps_redone == 2 and g.startup_seconds == pytest.approx(1.0)


def test_a_hang_is_blamed_on_the_diagnosed_laggard_and_its_diagnosis_kept(tmp_path):
    write(tmp_path, hang_run())
    run = runlog.summarise(runlog.read(tmp_path))
    hung, after = run.attempts
    assert (hung.hung, hung.hang_timeout, after.hung, after.diagnosis) == (True, 90.0, False, None)
    # Rank 0 was silent longest, but the loop blames the laggard: so does the summary.
    assert (hung.failed_rank, hung.last_stderr) == (1, "rank 1 spins")
    assert hung.failed_at == pytest.approx(100 - 94.5) and hung.detected_at == pytest.approx(100.03)
    assert run.last_failure["rank"] == 1 and runlog.failure_text(run.last_failure) == \
        "rank 1 hung: no sign of progress for 94.5 s: rank 1 spins"
    d = hung.diagnosis
    assert (d.kind, d.summary, d.laggards, d.stacks, d.stacks_error) == ("hang", SUMMARY, [1], STACKS, None)
    assert d.frames == {"1": ["job.py:7 in spin_forever", "job.py:13 in <module>"]} and d.unanswered == {}
    attempt = run.to_dict()["attempts"][0]
    assert attempt["hung"] is True and attempt["diagnosis"]["laggards"] == [1]
    assert attempt["diagnosis"]["stacks"] == STACKS and attempt["diagnosis"]["summary"] == SUMMARY


def test_a_diagnosis_with_missing_or_odd_fields_is_kept_as_far_as_it_goes(tmp_path):
    write(tmp_path, hang_run(laggards=["1", True, 2], summary=None, stacks=None, stacks_error="not written: disk full",
                             frames=["not", "an", "object"], unanswered={"0": "no answer", "2": [1, "x"]},
                             shiny_new_field={"a": 1}))
    hung = runlog.summarise(runlog.read(tmp_path)).attempts[0]
    d = hung.diagnosis
    assert (d.summary, d.laggards, d.stacks, d.stacks_error, d.frames) == (None, [2], None, "not written: disk full", {})
    assert d.unanswered == {"0": ["no answer"], "2": ["1", "x"]}
    assert runlog.laggards_text(d) == "rank 2" and runlog.stacks_text(d) == "not written: disk full"
    # Laggard 2 was declared hung too: blamed, silent since 100 - 94.0.
    assert hung.failed_rank == 2 and hung.failed_at == pytest.approx(6.0)


def test_an_older_hang_without_diagnosis_and_a_failure_diagnosis_are_read(tmp_path):
    old = [line for line in hang_run() if '"hang_diagnosed"' not in line]
    old = [line.replace(', "timeout": 90.0', "") for line in old]
    write(tmp_path, old)
    hung = runlog.summarise(runlog.read(tmp_path)).attempts[0]
    assert (hung.hung, hung.hang_timeout, hung.diagnosis) == (True, None, None)
    assert hung.failed_rank == 0  # without a diagnosis: the longest silent, the first logged

    lines = crash_run()
    at = next(i for i, line in enumerate(lines) if '"to": "RECOVERING"' in line)
    lines.insert(at + 1, ev(2.01, "failure_diagnosed", rank=1, attempt=0, laggards=[],
                            summary="rank 0 waits in all_reduce #8", stacks=STACKS,
                            frames={"0": ["job.py:9 in all_reduce"]}, unanswered={}, seconds=0.01))
    write(tmp_path, lines)
    first, second = runlog.summarise(runlog.read(tmp_path)).attempts
    assert (first.hung, first.diagnosis.kind, first.diagnosis.laggards) == (False, "failure", [])
    assert first.diagnosis.summary == "rank 0 waits in all_reduce #8" and second.diagnosis is None
    assert runlog.laggards_text(first.diagnosis) == "none named"


def test_partial_garbage_and_unknown_lines_are_skipped_and_counted(tmp_path):
    lines = crash_run()
    lines.insert(3, "not json at all")
    lines.insert(4, json.dumps(["an", "array"]))
    lines.insert(5, json.dumps({"event": "no timestamp"}))
    lines.insert(6, ev(1.0, "from_a_newer_daemon", shiny=True, attempt={"nested": 1}))
    lines[7] = lines[7][:-1] + ', "unknown_field": [1, 2]}'
    write(tmp_path, lines, tail='{"timestamp": "2026-01-02T03:04:10Z", "level": "in')  # being written
    log = runlog.read(tmp_path)
    assert log.skipped == 4
    run = runlog.summarise(log)
    assert run.step == 20 and len(run.attempts) == 2 and run.skipped_lines == 4


def test_the_latest_run_is_chosen_and_another_one_by_its_id_or_a_prefix(tmp_path):
    write(tmp_path, crash_run("20260102T030405Z-aaaaaa") + crash_run("20260102T030500Z-bbbbbb")[:3])
    log = runlog.read(tmp_path)
    latest = runlog.summarise(log)
    assert latest.run_id == "20260102T030500Z-bbbbbb" and latest.run_index == 2
    assert (latest.exit_code, latest.step, latest.daemon) == (None, 1, "elsewhere")
    assert runlog.summarise(log, "20260102T0304").state == "DONE"
    with pytest.raises(ReaderError, match="2 runs"):
        log.select("20260102T03")
    with pytest.raises(ReaderError, match="no runs"):
        log.select("nope")


def test_events_without_a_run_id_form_one_run_per_daemon_start(tmp_path):
    unnamed = [json.dumps({k: v for k, v in json.loads(line).items() if k != "run_id"})
               for line in crash_run()]
    write(tmp_path, unnamed + unnamed[:2] + crash_run("new"))
    assert list(runlog.read(tmp_path).runs) == ["unnamed-1", "unnamed-2", "new"]


def test_a_dir_without_events_is_a_one_line_error(tmp_path):
    with pytest.raises(ReaderError, match="no events.jsonl"):
        runlog.read(tmp_path)
    write(tmp_path, ["garbage"])
    with pytest.raises(ReaderError, match="no events"):
        runlog.read(tmp_path)


def test_run_ids_start_with_the_utc_second_so_they_sort_by_start_and_differ():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run_id = runlog.new_run_id()
    started = datetime.strptime(run_id.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert before <= started <= datetime.now(timezone.utc)
    assert len({runlog.new_run_id() for _ in range(100)}) == 100


def test_a_live_pid_is_the_daemon_only_if_it_started_before_its_first_event():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        now = time.time()
        assert runlog.pid_is(proc.pid, now)
        assert not runlog.pid_is(proc.pid, now - 60)  # a process that started later: a reused pid
    finally:
        proc.communicate(b"", timeout=10)
    assert not runlog.pid_is(proc.pid, now)


def test_a_failures_explained_cause_and_its_recoverys_phases_are_read_and_garbage_is_not(tmp_path):
    lines = crash_run()
    at = next(i for i, line in enumerate(lines) if '"teardown"' in line)
    lines.insert(at + 1, ev(2.15, "failure_explained", rank=1, attempt=0, cause="exception",
                            exception="ValueError", where="job.py:88 in load_batch",
                            message="no batch 150", knock_on=[0], also_failed=[]))
    phases = {"detection": 0.002, "diagnosis": 0.1, "jit_wait": 0.0, "teardown": 0.099,
              "relaunch": 0.2, "first_progress": 1.2}
    first_step = next(i for i, line in enumerate(lines) if '"attempt": 1' in line and '"step"' in line)
    lines.insert(first_step, ev(3.6, "recovered", rank=0, attempt=1, step=6, seconds=1.6, phases=phases))
    write(tmp_path, lines)
    run = runlog.summarise(runlog.read(tmp_path))
    first = run.attempts[0]
    assert first.explained.text() == ("rank 1: exception ValueError at job.py:88 in load_batch: "
                                      "no batch 150 (rank 0 died of it)")
    assert first.phases == phases
    text = runlog.failure_text(run.last_failure)
    assert text.startswith("rank 1: exception ValueError at job.py:88 in load_batch")
    assert "recovery detection 0.00 s, diagnosis 0.10 s" in text
    # a newer or broken daemon's fields: whatever is not what it should be is left out
    lines[at + 1] = ev(2.15, "failure_explained", rank="one", attempt=0, cause=7, knock_on="0",
                       where=None)
    lines[first_step] = ev(3.6, "recovered", rank=0, attempt=1, phases={"teardown": "slow", "relaunch": 0.2})
    write(tmp_path, lines)
    run = runlog.summarise(runlog.read(tmp_path))
    assert run.attempts[0].explained.text() == "no rank in sight: unexplained"
    assert run.attempts[0].phases == {"relaunch": 0.2}


def as_logged(event: dict) -> str:
    """An event as the daemon writes it: compact, a worker's ``step`` as ``worker_step``."""
    if event["event"] == "worker_output" and "step" in event:
        event = {("worker_step" if k == "step" else k): v for k, v in event.items()}
    return json.dumps(event, separators=(",", ":"))


def test_status_reads_only_what_it_needs_and_sees_what_a_full_read_sees(tmp_path):
    """The daemon's own (compact) line format, with what a job adds to it: a blank stderr line
    after the one that explains the failure, a JSON object on stderr, a rank that never reports
    a step, a late step of the previous attempt after the relaunch, a step that is no number,
    and another run before this one."""
    lines = crash_run("r0") + crash_run()
    at = lines.index(next(line for line in lines[len(lines) // 2:] if '"line": "boom"' in line)) + 1
    lines[at:at] = [ev(1.81, "worker_output", rank=1, restart=0, attempt=0, stream="stderr", line=""),
                    ev(1.82, "worker_output", rank=1, restart=0, attempt=0, stream="stderr",
                       worker_event="warning", text="a JSON object")]
    relaunch = lines.index(next(line for line in lines[at:] if '"launching"' in line)) + 1
    lines[relaunch:relaunch] = [step(2.35, 0, 8, 0)]
    lines += [ev(8.0 + n / 10, "worker_output", rank=2, restart=1, attempt=1, stream="stdout", line=f"r2 {n}")
              for n in range(20)]
    lines += [ev(9.0, "worker_output", rank=0, restart=1, attempt=1, stream="stdout", worker_event="step",
                 worker_step="x")]
    lines += [step(9.5 + n / 10, r, n, 1) for n in range(21, 40) for r in (0, 1)]
    write(tmp_path, [as_logged(json.loads(line)) for line in lines])
    full, sparse = runlog.read(tmp_path), runlog.read(tmp_path, every_step=False)
    for run_id in ("r0", "r1"):
        assert runlog.summarise(sparse, run_id).to_dict() == runlog.summarise(full, run_id).to_dict()
    run = runlog.summarise(sparse)
    assert run.last_failure["last_stderr"] == "boom" and run.step == 39
    assert sparse.decoded < full.decoded / 2
