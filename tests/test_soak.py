"""The long chaos soak (`make soak`, not part of `make test`): many random faults in one run.

Faults, chosen at random at random steps: SIGKILL of a random rank, SIGKILL of rank 0 as it
starts a checkpoint write, SIGSTOP of a random rank (a hang), and SIGKILL of the daemon itself
followed by a re-run on the same directories. The run must end DONE with final weights
bit-identical to a fault-free run, and no checkpoint may ever be rejected or selected corrupt.
SOAK_FAULTS (default 30) and SOAK_SEED (default 0) set the size and the sequence.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
import time

import pytest

from harness import Daemon

pytestmark = pytest.mark.soak

JOB = [sys.executable, "-m", "supervisord_ft_worker", "--epochs", "60", "--steps", "30", "--checkpoint_interval", "10",
       "--hidden", "512", "--step_time", "0.005"]
OPTIONS = ["--grace-period", "2", "--restart-backoff", "0", "--hang-timeout", "3",
           "--max-restarts", "1000"]
KINDS = ("sigkill_rank", "sigkill_mid_checkpoint", "sigstop_rank", "sigkill_daemon")


def final_sha(d: Daemon) -> str:
    (sha,) = {e["weights_sha256"] for e in d.named("worker_output", worker_event="training_done")}
    return sha


async def run_to_end(d: Daemon) -> None:
    try:
        assert await d.finish(timeout=600) == 0
    finally:
        await d.kill()


async def test_soak_random_faults_end_bit_identical(tmp_path):
    faults = int(os.environ.get("SOAK_FAULTS", "30"))
    rnd = random.Random(int(os.environ.get("SOAK_SEED", "0")))
    (tmp_path / "ref").mkdir()
    reference = await Daemon.start(tmp_path / "ref", *OPTIONS, command=JOB)
    await run_to_end(reference)

    (tmp_path / "run").mkdir()
    daemons = [await Daemon.start(tmp_path / "run", *OPTIONS, command=JOB)]
    done: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    try:
        while sum(done.values()) < faults:
            d = daemons[-1]
            await d.wait_for(lambda e: e["event"] == "launching")
            restart = d.named("launching")[-1]["restart"]
            first = await d.wait_for(lambda e: e.get("worker_event") == "step" and e["restart"] == restart)
            kind = rnd.choice(KINDS)
            if kind == "sigkill_mid_checkpoint":  # rank 0 prints the step, then writes the file
                target = (first["worker_step"] // 10 + 1 + rnd.randrange(3)) * 10
                await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == 0
                                 and e["restart"] == restart and e["worker_step"] >= target)
                victim = d.named("worker_started", restart=restart, rank=0)[0]["pid"]
            else:
                target = first["worker_step"] + rnd.randrange(3, 40)
                await d.wait_for(lambda e: e.get("worker_event") == "step" and e["restart"] == restart
                                 and e["worker_step"] >= target)
                victim = rnd.choice(d.named("worker_started", restart=restart))["pid"]
            if kind == "sigkill_daemon":
                assert await d.sigkill(within=2) == [], "a worker outlived the daemon"
                daemons.append(await Daemon.start(tmp_path / "run", *OPTIONS, command=JOB))
            else:
                os.kill(victim, signal.SIGSTOP if kind == "sigstop_rank" else signal.SIGKILL)
                await d.wait_for(lambda e: e["event"] == "launching" and e["restart"] == restart + 1,
                                 timeout=60)
            done[kind] += 1
        await run_to_end(daemons[-1])
    finally:
        for d in daemons:
            await d.kill()
    rejected = [e for d in daemons for e in d.named("checkpoint_rejected")]
    print(f"\nsoak: {sum(done.values())} faults in {time.monotonic() - started:.0f} s: {dict(done)}; "
          f"launches {sum(len(d.named('launching')) for d in daemons)}; "
          f"checkpoints rejected: {len(rejected)}")
    assert rejected == []
    assert final_sha(daemons[-1]) == final_sha(reference)
