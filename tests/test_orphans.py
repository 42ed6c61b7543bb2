"""Nothing a worker started outlives the run: at its end, at every teardown, after a daemon SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from harness import FAKE_WORKER, pid_alive

from supervisord_ft import orphans, procfs

LONG = ["--steps", "2000", "--step-time", "0.01"]


def children_started(d) -> list[int]:
    return [e["worker_pid"] for e in d.named("worker_output", worker_event="child")]


def kill_pids(pids: list[int]) -> None:
    """Cleanup for a test that failed: processes that should have been killed for us."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_child_left_in_a_workers_group_does_not_outlive_done(daemon, tmp_path):
    d = await daemon(command=[*FAKE_WORKER, "--steps", "3", "--spawn-child"])
    try:
        assert await d.finish() == 0
        children = children_started(d)
        assert len(children) == 2
        assert not any(pid_alive(p) for p in children)
        assert d.named("orphans_killed")[0]["pids"] == sorted(children)
        assert not (tmp_path / "run" / orphans.RECORD_NAME).exists()  # nothing left to record
    finally:
        kill_pids(children_started(d))


async def test_a_detached_child_is_killed_and_reaped_at_every_teardown(daemon):
    d = await daemon("--grace-period", "0.5", "--restart-backoff", "0", "--max-restarts", "1",
                     command=[*FAKE_WORKER, "--steps", "30", "--step-time", "0.02", "--spawn-child",
                              "detached", "--fail-rank", "0", "--fail-at-step", "5"])
    try:
        await d.wait_for(lambda e: e["event"] == "launching" and e["restart"] == 1)
        first = children_started(d)
        assert len(first) == 2
        # killed and reaped: gone from /proc, not a zombie of the daemon
        assert [procfs.stat(p) for p in first] == [None, None]
        assert sorted(d.named("orphans_killed")[0]["pids"]) == sorted(first)
        assert await d.finish() == 0
        assert not any(pid_alive(p) for p in children_started(d))
    finally:
        kill_pids(children_started(d))


async def test_after_a_daemon_sigkill_the_next_daemon_kills_what_its_workers_left(daemon, tmp_path):
    first = await daemon(command=[*FAKE_WORKER, *LONG, "--spawn-child"])
    try:
        for rank in (0, 1):
            await first.wait_for(lambda e: e.get("worker_event") == "child" and e["rank"] == rank)
        children = children_started(first)
        assert await first.sigkill() == []  # the workers died of the parent-death signal...
        assert all(pid_alive(p) for p in children)  # ...their children did not
        second = await daemon(command=[*FAKE_WORKER, "--steps", "1"])
        assert await second.finish() == 0
        killed = second.named("leftovers_killed")
        assert len(killed) == 1 and killed[0]["pids"] == sorted(children)
        assert killed[0]["groups"] == sorted(first.worker_pids())
        assert second.events.index(killed[0]) < second.events.index(second.named("launching")[0])
        assert not any(pid_alive(p) for p in children)
    finally:
        kill_pids(children_started(first))


def write_record(run_dir, groups: list[int], last_write: float) -> None:
    """The record of a dead daemon (pid 0 is never a process) that last wrote at ``last_write``."""
    run_dir.mkdir()
    path = run_dir / orphans.RECORD_NAME
    path.write_text(json.dumps({"daemon": {"pid": 0, "start_ticks": 0}, "groups": groups}))
    os.utime(path, (last_write, last_write))


def test_a_recorded_group_id_now_used_by_a_newer_group_is_never_touched(tmp_path):
    # A group created after the predecessor's last write stands for a reused group id.
    newer = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        write_record(tmp_path / "run", [newer.pid], last_write=time.time() - 1)
        assert orphans.find_leftovers(tmp_path / "run").groups == {}
    finally:
        newer.kill()
        newer.wait()


def test_a_recorded_group_with_a_member_older_than_the_last_write_is_taken(tmp_path):
    older = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        write_record(tmp_path / "run", [older.pid], last_write=time.time() + 1)
        found = orphans.find_leftovers(tmp_path / "run")
        assert [m.pid for m in found.groups[older.pid]] == [older.pid]
    finally:
        older.kill()
        older.wait()
