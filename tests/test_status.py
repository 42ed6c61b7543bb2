"""run_id on every event and in every rank's environment; `supervisord-ft status` on a live,
finished and killed daemon."""

from __future__ import annotations

import json
import re
import signal
import sys

from harness import FAKE_WORKER, cli

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
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["attempt"] == 1)
    assert await d.sigkill() == []
    rc, text, _ = await cli("status", str(tmp_path / "run"))
    lines = dict(line.split(None, 1) for line in text.replace("last failure", "failure").splitlines())
    assert rc == 0
    assert lines["state"].startswith(f"daemon gone: pid {d.proc.pid} ended without supervisor_exit; "
                                     "last state RUNNING")
    assert lines["restarts"] == "1 (2 attempts)"
    # when, the loop's reason, the rank's last stderr line
    assert re.fullmatch(r"\d\d:\d\d:\d\d rank 1 exited with 1: rank 1 failing at step 2",
                        lines["failure"])


async def test_status_of_a_dir_without_a_run_exits_2_with_one_line(tmp_path):
    rc, out, err = await cli("status", str(tmp_path))
    assert (rc, out) == (2, "")
    assert err == f"supervisord-ft: error: {tmp_path}: no events.jsonl (not a run dir, or no run " \
                  "started there)\n"
