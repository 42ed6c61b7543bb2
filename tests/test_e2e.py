"""End to end: the real daemon supervising the real 2-rank torch worker over gloo."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

import pytest

from harness import ROOT, Daemon, pid_alive, pool_ready
from supervisord_ft import checkpoints

pytestmark = pytest.mark.e2e

# 60 global steps, a checkpoint every 5. Sizes and seed match between a run and its reference.
SIZES = ["--epochs", "3", "--steps", "20", "--checkpoint-interval", "5"]
WORKER = [sys.executable, "-m", "supervisord_ft_worker", "--epochs", "3", "--steps", "20", "--checkpoint_interval", "5"]
COMMON = ["--grace-period", "5", "--restart-backoff", "0", "--hang-timeout", "20"]


def final_sha(d: Daemon) -> str:
    shas = {e["weights_sha256"] for e in d.named("worker_output", worker_event="training_done")}
    assert len(shas) == 1, shas  # every rank reports the same weights
    return shas.pop()


def steps_seen(d: Daemon, restart: int) -> list[int]:
    return [e["worker_step"] for e in d.named("worker_output", rank=0, restart=restart, worker_event="step")]


@pytest.fixture(scope="module")
def reference_sha(tmp_path_factory) -> str:
    """The uninterrupted run's final weights, computed once for the module."""
    async def run() -> str:
        d = await Daemon.start(tmp_path_factory.mktemp("reference"), *COMMON, *SIZES)
        try:
            assert await d.finish(timeout=120) == 0
        finally:
            await d.kill()
        assert d.events[-1]["restarts"] == 0
        return final_sha(d)
    return asyncio.run(run())


async def test_a_crash_costs_no_step_the_survivor_saves_just_in_time_and_weights_match(daemon, reference_sha):
    d = await daemon(*COMMON, *SIZES, "--crash-at-step", "23", "--crash-rank", "1")
    assert await d.finish(timeout=120) == 0
    assert d.named("worker_exited", rank=1, restart=0)[0]["returncode"] == 1
    assert d.named("jit_checkpoint_wait")[0]["exited_on_their_own"] == [0]  # saved, then exited
    assert d.named("checkpoint_selected")[-1]["step"] == 23  # not the periodic one of step 20
    assert steps_seen(d, 1)[0] == 24 and d.named("recovered")[0]["step"] == 24
    assert final_sha(d) == reference_sha


async def test_with_jit_checkpoint_timeout_0_a_crash_resumes_from_the_periodic_checkpoint(daemon, reference_sha):
    d = await daemon(*COMMON, *SIZES, "--crash-at-step", "23", "--crash-rank", "1", "--jit-checkpoint-timeout", "0")
    assert await d.finish(timeout=120) == 0
    # The newest periodic one: 20, or 15 when the background save of 20 had not finished by the
    # teardown (a loaded machine: rank 0's writer behind), never the crash's step 23.
    resumed = d.named("checkpoint_selected")[-1]["step"]
    assert resumed in (15, 20)
    assert steps_seen(d, 1)[0] == resumed + 1  # the steps since redone
    assert final_sha(d) == reference_sha


async def test_keep_checkpoints_holds_at_done_the_file_resumed_from_included(daemon, tmp_path):
    # the ranks of the relaunch keep the file they resumed from; the daemon prunes it at DONE
    d = await daemon(*COMMON, *SIZES, "--crash-at-step", "23", "--crash-rank", "1", "--keep-checkpoints", "2")
    assert await d.finish(timeout=120) == 0
    assert checkpoints.steps(tmp_path / "ckpt") == [60, 55]
    assert d.named("checkpoint_pruned")[-1]["path"] == d.named("checkpoint_selected")[-1]["path"]


async def test_sigusr1_makes_every_rank_checkpoint_at_the_next_step_and_training_goes_on(daemon, reference_sha):
    # no periodic save before the last step: any earlier save is the requested one
    d = await daemon(*COMMON, command=[*WORKER, "--step_time", "0.05", "--checkpoint_interval", "1000"])
    for rank in (0, 1):
        await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == rank and e["worker_step"] >= 7)
    d.signal(signal.SIGUSR1)  # SLURM's --signal=USR1@T: checkpoint before the time limit
    assert (await d.wait_for(lambda e: e["event"] == "signal_forwarded"))["ranks"] == [0, 1]
    saved = await d.wait_for(lambda e: e.get("worker_event") == "checkpoint_saved")
    assert await d.finish(timeout=120) == 0
    assert 7 < saved["worker_step"] < 60 and d.events[-1]["restarts"] == 0
    assert final_sha(d) == reference_sha  # an extra save changes nothing in the training


async def test_sigterm_checkpoints_exits_143_and_a_rerun_resumes_with_no_lost_step(daemon, reference_sha):
    slow = [*WORKER, "--step_time", "0.05"]
    d = await daemon(*COMMON, command=slow)
    for rank in (0, 1):
        await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == rank and e["worker_step"] >= 8)
    d.signal(signal.SIGTERM)
    assert await d.finish(timeout=60) == 143
    stopped = {e["worker_step"] for e in d.named("worker_output", worker_event="stopped")}
    assert len(stopped) == 1  # both ranks agreed on one stop step
    stop_step = stopped.pop()
    assert checkpoints.discover(d.workdir / "ckpt").newest.step == stop_step

    again = await daemon(*COMMON, command=slow)
    assert await again.finish(timeout=120) == 0
    assert again.named("checkpoint_selected")[0]["step"] == stop_step
    assert steps_seen(again, 0)[0] == stop_step + 1
    assert final_sha(again) == reference_sha


async def test_a_rank_that_exits_0_early_blocks_its_peer_and_the_group_recovers(daemon, reference_sha):
    d = await daemon(*COMMON, command=[*WORKER, "--crash_at_step", "12", "--crash_rank", "1",
                                       "--crash_exit_code", "0"])
    assert await d.finish(timeout=120) == 0
    assert d.named("worker_exited", rank=1, restart=0)[0]["returncode"] == 0
    assert d.states()[2] == "RECOVERING"  # rank 0 failed (or hung) without its peer
    assert final_sha(d) == reference_sha


async def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(daemon, reference_sha):
    d = await daemon(*COMMON, command=[*WORKER, "--disk_full_at_step", "15"])
    assert await d.finish(timeout=120) == 0
    failed = d.named("worker_output", rank=0, worker_event="checkpoint_failed")
    assert failed[0]["worker_step"] == 15 and "too large" in failed[0]["error"]
    assert d.named("worker_exited", rank=0, restart=0)[0]["returncode"] == 3
    # no partial file took a final name, nothing rejected; rank 1, whose disk is fine, saved the
    # last step rank 0 completed before it exited
    assert d.named("checkpoint_rejected") == []
    assert d.named("checkpoint_selected")[1]["step"] == max(steps_seen(d, 0))
    assert final_sha(d) == reference_sha


async def test_random_sigkills_of_random_ranks_still_end_bit_identical(daemon, reference_sha):
    rnd = random.Random(1234)
    d = await daemon(*COMMON, "--max-restarts", "10", command=[*WORKER, "--step_time", "0.01"])
    survivors = []
    for restart in range(3):
        target = rnd.randrange(2, 19)  # a random step, often beside a checkpoint write
        event = await d.wait_for(lambda e: e.get("worker_event") == "step" and e["restart"] == restart
                                 and e["worker_step"] >= target, timeout=60)
        victim = rnd.choice(d.named("worker_started", restart=restart))
        if event["worker_step"] < 55 and pid_alive(victim["pid"]):
            os.kill(victim["pid"], signal.SIGKILL)
            survivors.append(1 - victim["rank"])
            await d.wait_for(lambda e: e["event"] == "launching" and e["restart"] == restart + 1)
    assert await d.finish(timeout=120) == 0
    assert len(survivors) == 3 and d.events[-1]["restarts"] == 3
    assert d.named("checkpoint_rejected") == []
    for restart, survivor in enumerate(survivors):  # no completed step is ever done twice
        done = [e["worker_step"] for e in d.named("worker_output", rank=survivor, restart=restart, worker_event="step")]
        # (the next attempt's victim may die before its first line: take the first any rank reported)
        resumed = [e["worker_step"] for e in d.named("worker_output", restart=restart + 1, worker_event="step")]
        assert min(resumed) == max(done) + 1
    assert final_sha(d) == reference_sha


async def test_sigkill_of_the_daemon_kills_torch_workers_and_a_rerun_resumes(daemon, reference_sha):
    d = await daemon(*COMMON, command=[*WORKER, "--step_time", "0.02"])
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["worker_step"] >= random.randrange(6, 30))
    assert await d.sigkill(within=2) == []
    newest = checkpoints.discover(d.workdir / "ckpt").newest

    again = await daemon(*COMMON, command=[*WORKER, "--step_time", "0.02"])
    assert await again.finish(timeout=120) == 0
    assert again.named("checkpoint_selected")[0]["step"] == (newest.step if newest else None)
    assert final_sha(again) == reference_sha


async def test_the_readme_demo_recovers_from_its_injected_crash_and_ends_done(daemon):
    d = await daemon("--config", str(ROOT / "configs" / "demo.toml"))
    assert await d.finish(timeout=180) == 0
    assert d.states() == ["LAUNCHING", "RUNNING", "RECOVERING", "LAUNCHING", "RUNNING", "DONE"]
    assert d.named("checkpoint_selected")[-1]["step"] == 1505
    assert d.named("recovered")[0]["step"] == 1506


async def test_the_example_script_resumes_after_a_rank_is_killed(daemon):
    d = await daemon(*COMMON, command=[sys.executable, str(ROOT / "examples" / "minimal_train.py"),
                                       "--steps", "400", "--checkpoint-every", "20"])
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == 1 and e["worker_step"] >= 50)
    os.kill(d.named("worker_started", rank=1)[0]["pid"], signal.SIGKILL)
    assert await d.finish(timeout=120) == 0
    selected = d.named("checkpoint_selected")[-1]["step"]
    assert selected == max(steps_seen(d, 0))  # rank 0 saved its last step just in time
    assert d.named("worker_output", rank=0, restart=0, worker_event="jit_checkpoint")
    assert steps_seen(d, 1)[0] == selected + 1
    assert max(steps_seen(d, 1)) == 400


async def test_the_example_script_recovers_warm_through_the_standby_pool_and_the_store_host(daemon):
    """A plain torchrun-style script, the defaults on: the relaunched ranks are the standbys, each
    attempt has its own store, and the resume starts at the survivor's just-in-time checkpoint."""
    d = await daemon(*COMMON, "--standby", "--store-host",
                     command=[sys.executable, str(ROOT / "examples" / "minimal_train.py"), "--steps", "10000000"])
    # Training, with a pool that holds what the ranks imported (it starts with the launch, and is
    # replaced by one with the learnt modules once the group settled).
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == 0, timeout=120)
    learnt = await d.wait_for(lambda e: e["event"] == "preload_learnt", timeout=120)
    await pool_ready(d, learnt=learnt["total"], timeout=120)
    os.kill(d.named("worker_started", rank=1)[0]["pid"], signal.SIGKILL)
    await d.wait_for(lambda e: e["event"] == "recovered")
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == 0 and e["restart"] == 1)
    handed = {e["standby_pid"] for e in d.named("standby_state", to="handed_out")}
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == handed and len(handed) == 2
    assert [e["attempt"] for e in d.named("store_ready")] == [0, 1]
    assert len({e["port"] for e in d.named("store_ready")}) == 2
    assert d.named("checkpoint_selected")[-1]["step"] == max(steps_seen(d, 0))
    assert min(steps_seen(d, 1)) == max(steps_seen(d, 0)) + 1  # no completed step lost
    d.proc.send_signal(signal.SIGTERM)
    assert await d.finish() == 128 + signal.SIGTERM
