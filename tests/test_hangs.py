"""Hangs judged by what torch records: silent healthy jobs live, real hangs are diagnosed first.

The jobs are plain DDP scripts written as users write them (``tests/jobs``): no step lines, and
only rank 0 prints, or nobody does.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from harness import Daemon
from supervisord_ft.errors import EXIT_FAILED

pytestmark = pytest.mark.e2e

DDP = [sys.executable, str(Path(__file__).with_name("jobs") / "ddp_plain.py")]
SCALED = ["--hang-timeout", "6", "--startup-timeout", "6", "--grace-period", "2",
          "--restart-backoff", "0"]


def no_hang(d: Daemon) -> None:
    assert d.named("hang_detected") == [] and d.named("hang_diagnosed") == []
    assert d.named("supervisor_exit")[0]["restarts"] == 0


async def test_ddp_jobs_with_silent_ranks_run_30_s_at_6_s_limits_and_end_done(daemon):
    """Rank 0 prints a line a second, or no rank ever prints: both at once, each its own daemon."""
    runs = {printing: await daemon(*SCALED, "--num-workers", "2", within=printing,
                                   command=[*DDP, "--steps", "600", "--step-time", "0.05", "--print", printing])
            for printing in ("rank0", "none")}
    for d in runs.values():
        assert await d.finish(timeout=150) == 0
    for d in runs.values():
        no_hang(d)
        assert d.named("channel_unavailable") == []
        started, ended = d.named("launching")[0]["timestamp"], d.named("supervisor_exit")[0]["timestamp"]
        assert ended > started  # (ISO strings) and the run lasted: 600 steps of 50 ms
        exits = d.named("worker_exited")
        assert len(exits) == 2 and min(e["runtime"] for e in exits) > 30


async def test_a_rank_stuck_silently_is_diagnosed_as_the_laggard_before_the_kill(daemon):
    """Rank 1 stuck in a pure-Python spin, or asleep: both at once, each its own daemon."""
    runs = {(mode, function): await daemon(
                *SCALED, "--num-workers", "3", "--standby", within=mode,
                command=[*DDP, "--steps", "250", "--step-time", "0.02", "--print", "none",
                         "--hang-rank", "1", "--hang-step", "100", "--hang-mode", mode])
            for mode, function in (("spin", "spin_forever"), ("sleep", "sleep_forever"))}
    for d in runs.values():
        assert await d.finish(timeout=180) == 0
    for (mode, function), d in runs.items():
        assert {h["rank"] for h in d.named("hang_detected")} == {0, 1, 2}  # the whole group stopped
        assert d.named("state_changed", to="RECOVERING")[0]["reason"].startswith("rank 1 hung: ")
        [diag] = d.named("hang_diagnosed")
        assert diag["laggards"] == [1], diag
        assert diag["summary"].startswith("rank 1 at ddp_plain.py:") and f"in {function}, outside any collective" in diag["summary"]
        assert "ranks 0, 2 wait in all_reduce #" in diag["summary"]
        assert diag["seconds"] < 1 and diag["unanswered"] == {}
        files = Path(diag["stacks"])
        assert f"in {function}" in (files / "rank-1.txt").read_text()
        rank0 = (files / "rank-0.txt").read_text()
        assert "in all_reduce" in rank0 and "waiting in all_reduce" in rank0
        # The diagnosis came before any signal: every rank was alive to answer, then the teardown.
        names = [e["event"] for e in d.events]
        assert names.index("hang_diagnosed") < names.index("teardown")
        assert d.named("state_changed")[-1]["to"] == "DONE"
        assert len(d.named("hang_detected", attempt=1)) == 0  # the warm relaunch is silent too: no hang


async def test_a_stopped_rank_that_cannot_answer_is_noted_and_the_teardown_is_not_delayed(daemon):
    d = await daemon(*SCALED, "--num-workers", "2",
                     command=[*DDP, "--steps", "2000", "--step-time", "0.02", "--print", "rank0"])
    await d.wait_for(lambda e: e.get("event") == "worker_output" and e["rank"] == 0, timeout=60)
    stopped = d.named("worker_started", rank=1)[0]["pid"]
    import os
    os.kill(stopped, signal.SIGSTOP)
    diag = await d.wait_for(lambda e: e.get("event") == "hang_diagnosed", timeout=60)
    d.signal(signal.SIGTERM)
    assert await d.finish(timeout=60) == 128 + signal.SIGTERM
    assert "1" in diag["unanswered"] and any("no answer within" in p for p in diag["unanswered"]["1"])
    assert diag["laggards"] == [1]  # the one that is not in the collective the other waits in
    assert diag["seconds"] < 5  # ASK_TIMEOUT, then py-spy's bound if it is installed


@pytest.mark.slow  # its subject is the default 90 s floor: `make test-slow`, which CI runs
async def test_with_the_defaults_a_50_ms_job_whose_rank_spins_is_declared_hung_within_120_s(daemon):
    d = await daemon("--num-workers", "2",
                     command=[*DDP, "--steps", "100000", "--step-time", "0.05", "--print", "rank0",
                              "--hang-rank", "1", "--hang-step", "300", "--hang-mode", "spin"])
    hang = await d.wait_for(lambda e: e.get("event") == "hang_detected", timeout=240)
    d.signal(signal.SIGTERM)
    await d.finish(timeout=60)
    learnt = d.named("hang_timeout_learnt")
    assert learnt and learnt[-1]["timeout"] == 90.0  # the floor: 40x 50 ms is less
    assert hang["timeout"] == 90.0 and hang["silent_for"] < 120
    assert d.named("hang_diagnosed")[0]["laggards"] == [1]


@pytest.mark.parametrize("phase", [
    ["--slow-every", "50", "--slow-factor", "20"],  # every 50th step 20x longer (2 s)
    ["--save-every", "120", "--save-seconds", "8"],  # rank 0 saves for 8 s, the other waits
], ids=["slow-step", "save"])
async def test_slow_phases_are_not_hangs_under_a_learnt_limit(daemon, phase):
    d = await daemon("--num-workers", "2", "--hang-floor", "0", "--hang-timeout", "600",
                     command=[*DDP, "--steps", "130", "--step-time", "0.1", "--print", "none", *phase])
    assert await d.finish(timeout=180) == 0
    no_hang(d)
    learnt = d.named("hang_timeout_learnt")
    assert learnt and learnt[0]["timeout"] < 8  # the rule was in force before the first slow phase


async def test_a_checkpoint_load_at_start_is_not_a_hang(daemon):
    d = await daemon(*SCALED, "--num-workers", "2",
                     command=[*DDP, "--steps", "50", "--print", "none", "--load-seconds", "12"])
    assert await d.finish(timeout=120) == 0
    no_hang(d)


async def test_a_lightning_ddp_job_runs_at_scaled_down_limits_and_ends_done(daemon):
    pytest.importorskip("lightning")  # the test extra installs it
    job = str(Path(__file__).with_name("jobs") / "lightning_ddp.py")
    d = await daemon(*SCALED, "--num-workers", "2",
                     command=[sys.executable, job, "--steps", "300", "--step-time", "0.05", "--devices", "2"])
    assert await d.finish(timeout=180) == 0
    no_hang(d)
    assert min(e["runtime"] for e in d.named("worker_exited")) > 15  # silent for longer than 6 s


async def test_ranks_slow_to_exit_after_their_work_get_one_more_limit_and_one_stuck_there_is_hung(daemon):
    """Past torch's exit handlers a rank's channel still answers, with every handler gone: it is
    exiting. A 4.5 s exit at a 3 s limit ends DONE; an exit that never ends is a hang, declared
    one limit later."""
    job = str(Path(__file__).with_name("jobs") / "slow_exit.py")
    runs = {stall: await daemon("--hang-timeout", "3", "--startup-timeout", "60", "--grace-period", "2",
                                "--max-restarts", "0", "--num-workers", "2", within=stall,
                                command=[sys.executable, job, "--exit-stall", stall])
            for stall in ("4.5", "forever")}
    slow, stuck = runs["4.5"], runs["forever"]
    assert await slow.finish(timeout=90) == 0
    assert [sorted(e["ranks"]) for e in slow.named("hang_deferred")] == [[0, 1]]
    no_hang(slow)
    assert await stuck.finish(timeout=90) == EXIT_FAILED
    deferred, declared = stuck.named("hang_deferred"), stuck.named("hang_detected")
    assert len(deferred) == 1 and {e["rank"] for e in declared} == {0, 1}
    assert declared[0]["timestamp"] > deferred[0]["timestamp"]
