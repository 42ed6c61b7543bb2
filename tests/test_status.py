"""run_id on every event and in every rank's environment; `supervisord-ft status` on a live,
finished and killed daemon."""

from __future__ import annotations

import json
import re
import signal
import sys

from harness import FAKE_WORKER, cli
from supervisord_ft import runlog, status
from test_runlog import STACKS, SUMMARY, ev, hang_run

LONG = ["--steps", "2000", "--step-time", "0.01"]  # runs ~20 s unless stopped


async def test_every_event_of_a_run_carries_its_run_id_and_every_rank_gets_it(daemon, tmp_path):
    command = [*FAKE_WORKER, "--print-env", "--fail-rank", "0", "--fail-at-step", "1"]
    first = await daemon("--restart-backoff", "0", command=command)
    assert await first.finish() == 0
    second = await daemon(command=[*FAKE_WORKER, "--steps", "1"])
    assert await second.finish() == 0

    run_ids = {e.get("run_id") for e in first.events}
    assert len(run_ids) == 1 and None not in run_ids
    run_id = run_ids.pop()
    envs = {(e["rank"], e["attempt"]): e["env"] for e in first.named("worker_output", worker_event="env")}
    # Rank 1 of attempt 0 may be torn down before it prints; the others always print.
    assert {(0, 0), (0, 1), (1, 1)} <= set(envs)
    assert all(env["SUPERVISORD_FT_RUN_ID"] == env["TORCHELASTIC_RUN_ID"] == run_id for env in envs.values())
    assert {e["run_id"] for e in second.events} == {second.events[0]["run_id"]} != {run_id}
    in_file = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    assert in_file == first.events + second.events


async def test_a_worker_cannot_forge_the_run_id(daemon):
    forger = [sys.executable, "-c", "import json; print(json.dumps({'event': 'x', 'run_id': 'forged'}))"]
    d = await daemon("--num-workers", "1", command=forger)
    assert await d.finish() == 0
    line = d.named("worker_output", worker_event="x")[0]
    assert line["run_id"] == d.events[0]["run_id"] != "forged" and line["worker_run_id"] == "forged"


async def test_status_follows_a_live_daemon_to_its_exit(daemon, tmp_path):
    d = await daemon(command=[*FAKE_WORKER, *LONG])
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["worker_step"] >= 3)
    rc, out, _ = await cli("status", str(tmp_path / "run"), "--json")
    live = json.loads(out)
    assert rc == 0
    assert (live["daemon"], live["state"], live["pid"]) == ("running", "RUNNING", d.proc.pid)
    assert live["run_id"] == d.events[0]["run_id"] and live["step"] >= 3
    rc, text, _ = await cli("status", str(tmp_path / "run"))
    assert f"RUNNING (daemon pid {d.proc.pid})" in text.splitlines()[1]

    d.signal(signal.SIGTERM)
    assert await d.finish() == 143
    rc, out, _ = await cli("status", str(tmp_path / "run"), "--json")
    ended = json.loads(out)
    assert (ended["daemon"], ended["state"], ended["exit_code"], ended["restarts"]) == \
        ("exited", "STOPPED", 143, 0)


async def test_status_tells_a_crash_and_a_daemon_that_died_without_saying_so(daemon, tmp_path):
    d = await daemon("--restart-backoff", "0",
                     command=[*FAKE_WORKER, *LONG, "--fail-rank", "1", "--fail-at-step", "2"])
    await d.wait_for(lambda e: e["event"] == "recovered")
    await d.follow(lambda e: e["event"] == "recovered")  # in the file too: its writer is a thread
    assert await d.sigkill() == []
    rc, text, _ = await cli("status", str(tmp_path / "run"))
    lines = dict(line.split(None, 1) for line in text.replace("last failure", "failure").splitlines())
    assert rc == 0
    assert lines["state"].startswith(f"daemon gone: pid {d.proc.pid} ended without supervisor_exit; "
                                     "last state RUNNING")
    assert lines["restarts"] == "1 (2 attempts)"
    # when, the explained cause, where the recovery's time went
    assert re.fullmatch(r"\d\d:\d\d:\d\d rank 1: exit_code: rank 1 failing at step 2; recovery detection "
                        r"[\d.]+ s, diagnosis [\d.]+ s, jit_wait [\d.]+ s, teardown [\d.]+ s, relaunch "
                        r"[\d.]+ s, first_progress [\d.]+ s", lines["failure"])


async def test_status_of_a_dir_without_a_run_exits_2_with_one_line(tmp_path):
    rc, out, err = await cli("status", str(tmp_path))
    assert (rc, out) == (2, "")
    assert err == f"supervisord-ft: error: {tmp_path}: no events.jsonl (not a run dir, or no run " \
                  "started there)\n"


async def test_status_shows_each_hang_with_its_laggards_summary_and_stack_files(tmp_path):
    (tmp_path / "events.jsonl").write_text("\n".join(hang_run()) + "\n")
    rc, text, _ = await cli("status", str(tmp_path))
    assert rc == 0
    lines = text.splitlines()
    hang = next(i for i, line in enumerate(lines) if line.startswith("hang "))
    assert lines[hang].split(None, 1)[1] == f"attempt 0 at 03:05:45: {SUMMARY}"
    assert lines[hang + 1].split() == ["laggards", "rank", "1"]
    assert lines[hang + 2].split() == ["stacks", STACKS]
    assert "last failure  03:05:45 rank 1 hung: no sign of progress for 94.5 s: rank 1 spins" in lines

    rc, out, _ = await cli("status", str(tmp_path), "--json")
    hung, after = json.loads(out)["attempts"]
    assert (hung["hung"], hung["hang_timeout"], hung["failed_rank"]) == (True, 90.0, 1)
    assert hung["diagnosis"] == {"kind": "hang", "summary": SUMMARY, "laggards": [1], "stacks": STACKS,
                                 "stacks_error": None, "unanswered": {},
                                 "frames": {"1": ["job.py:7 in spin_forever", "job.py:13 in <module>"]}}
    assert (after["hung"], after["diagnosis"]) == (False, None)


async def test_status_of_a_hang_whose_files_were_not_written_or_that_was_not_diagnosed(tmp_path):
    (tmp_path / "events.jsonl").write_text("\n".join(
        hang_run(laggards=[], stacks=None, stacks_error="not written within 2 s")) + "\n")
    rc, text, _ = await cli("status", str(tmp_path))
    facts = [line.split(None, 1) for line in text.splitlines()]
    assert rc == 0
    assert ["laggards", "none named"] in facts
    assert ["stacks", "not written within 2 s"] in facts

    old = [line for line in hang_run() if '"hang_diagnosed"' not in line]  # an older daemon's log
    (tmp_path / "events.jsonl").write_text("\n".join(old) + "\n")
    rc, text, _ = await cli("status", str(tmp_path))
    facts = [line.split(None, 1) for line in text.splitlines()]
    assert ["hang", "attempt 0 at 03:05:45: rank 1 hung: no sign of progress for 94.5 s"] in facts
    assert not any(label in ("laggards", "stacks") for label, _ in facts)


def test_status_shows_the_last_three_hangs_of_a_run_that_hung_more_often(tmp_path):
    lines = [ev(0, "supervisor_start", pid=1, host="elsewhere.example", config={})]
    for n in range(5):
        lines += [ev(10 * n, "launching", restart=n, attempt=n, resume_from=None),
                  ev(10 * n + 9, "hang_detected", rank=0, restart=n, attempt=n, silent_for=8.0),
                  ev(10 * n + 9, "hang_diagnosed", attempt=n, laggards=[0], summary=f"hang {n}",
                     stacks=f"/d/attempt-{n}", frames={}, unanswered={}),
                  ev(10 * n + 9, "state_changed", **{"from": "RUNNING", "to": "RECOVERING"},
                     restart=n, attempt=n, reason="rank 0 hung")]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    facts = [line.split(None, 1) for line in status.lines(runlog.summarise(runlog.read(tmp_path)))]
    assert ["hangs", "5; the last 3 below, all in --json"] in facts
    assert [value for label, value in facts if label == "hang"] == \
        ["attempt 2 at 03:04:34: hang 2", "attempt 3 at 03:04:44: hang 3", "attempt 4 at 03:04:54: hang 4"]
    assert [value for label, value in facts if label == "stacks"] == [f"/d/attempt-{n}" for n in (2, 3, 4)]


HOSTILE = [  # a newer daemon's or a garbled line's fields, each of a type the reader cannot use
    dict(event="launching", attempt="x", restart=0, resume_from=5),
    dict(event="launching", attempt=1, restart="1", resume_from=["a", "b"]),
    dict(event="worker_output", rank="y", attempt=1, stream=3, worker_event="step", worker_step="z", line=7),
    dict(event="state_changed", attempt=1, reason={"why": 1}, to=["FAILED"], **{"from": 2}),
    dict(event="hang_detected", attempt=1, rank=1, silent_for="long", timeout=True),
    dict(event="hang_diagnosed", attempt=1, laggards="1", frames=[], unanswered="none", stacks=3),
    dict(event="failure_explained", attempt=1, rank=1, cause=1, knock_on=3, where=[]),
    dict(event="recovered", attempt=2, rank=0, seconds="fast", phases=[1, 2]),
    dict(event="checkpoint_selected", path=12, step="20"),
    dict(event="supervisor_exit", state=1, restarts="2", attempts=None, exit_code="0"),
]


async def test_status_and_report_read_a_log_whose_fields_have_other_types(tmp_path):
    from test_runlog import crash_run
    lines = crash_run() + [ev(6 + i, **e) for i, e in enumerate(HOSTILE)]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    for args in (["status", str(tmp_path)], ["status", str(tmp_path), "--json"],
                 ["report", str(tmp_path), "--output", str(tmp_path / "r.html")]):
        rc, out, err = await cli(*args)
        assert (rc, err) == (0, ""), args  # was: exit 70, a TypeError
    rc, out, _ = await cli("status", str(tmp_path))
    assert "step          20 / 20" in out  # what could be read still is


def test_status_into_a_closed_pipe_is_a_quiet_exit(tmp_path):
    """`status | head -1`: the reader goes away before the output is written."""
    import os
    import subprocess
    from harness import ROOT
    from test_runlog import crash_run
    (tmp_path / "events.jsonl").write_text("\n".join(crash_run()) + "\n")
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "supervisord_ft", "status", str(tmp_path)], stdout=write,
                          stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=60)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (128 + signal.SIGPIPE, b"")  # was: 70 and a traceback


async def test_status_reads_what_it_needs_of_a_real_log_and_summarises_it_as_a_full_read(daemon, tmp_path):
    """``status`` decodes a rank's first and latest step report of each stretch and its last
    stderr line before a failure, not every line: the daemon's line format, as the fast path
    recognises it, is the one the daemon writes (a change to either shows here)."""
    d = await daemon("--restart-backoff", "0", command=[
        *FAKE_WORKER, "--steps", "60", "--fail-rank", "1", "--fail-at-step", "30", "--flood", "200"])
    assert await d.finish() == 0
    full, sparse = runlog.read(tmp_path / "run"), runlog.read(tmp_path / "run", every_step=False)
    assert runlog.summarise(sparse).to_dict() == runlog.summarise(full).to_dict()
    assert full.decoded == full.lines > 600
    assert sparse.decoded < full.lines / 5
