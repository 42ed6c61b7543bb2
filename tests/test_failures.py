"""Every failure explained and acted on by its cause, with jobs that are not ours: a plain DDP
script with its own checkpoints (``tests/jobs/ddp_faults.py``) and a Lightning job."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisord_ft import procfs
from supervisord_ft.attempt import PHASES
from supervisord_ft.errors import EXIT_NO_REQUEUE

pytestmark = pytest.mark.e2e

JOBS = Path(__file__).with_name("jobs")
FAULTS = [sys.executable, str(JOBS / "ddp_faults.py")]
LIGHTNING = [sys.executable, str(JOBS / "lightning_ddp.py")]
FAST = ["--num-workers", "2", "--grace-period", "2", "--restart-backoff", "0"]


async def test_a_bug_that_recurs_at_the_same_step_ends_within_3_attempts_saying_do_not_requeue(daemon):
    d = await daemon(*FAST, "--max-restarts", "10", "--restart-window", "5",
                     command=[*FAULTS, "--steps", "400", "--save-every", "50",
                              "--raise-rank", "1", "--raise-step", "150"])
    assert await d.finish(timeout=180) == EXIT_NO_REQUEUE
    assert len(d.named("launching")) <= 3
    reason = d.named("state_changed", to="FAILED")[0]["reason"]
    assert "deterministic" in reason and "ValueError" in reason and "load_batch" in reason
    for e in d.named("failure_explained"):
        assert (e["rank"], e["cause"], e["exception"], e["source"]) == (1, "exception", "ValueError", "stderr")
        assert e["where"].startswith("ddp_faults.py:") and e["where"].endswith("in load_batch")
        assert e["knock_on"] in ([], [0])  # rank 0 died of the lost peer, or was torn down first


async def test_the_root_is_the_rank_that_raised_not_the_peer_that_died_first_of_it(daemon):
    # Rank 1 tears its group down (its connections stay open while it lives), waits 4 s, raises;
    # rank 0 dies first, of the lost peer, at its 1 s collective timeout. The store is in a helper,
    # as by default: rank 0 hosting it would wait at exit for rank 1 to go first.
    d = await daemon(*FAST, "--max-restarts", "1", "--store-host",
                     command=[*FAULTS, "--steps", "200", "--step-time", "0.03", "--save-every", "20",
                              "--fault-attempts", "1",
                              "--raise-rank", "1", "--raise-step", "30", "--knock-on", "--knock-on-delay", "4",
                              "--pg-timeout", "1"])
    assert await d.finish(timeout=180) == 0
    first = d.named("state_changed", to="RECOVERING")[0]["reason"]
    assert first.startswith("rank 0 exited with 1")  # rank 0 died first, of the lost peer
    explained = d.named("failure_explained")
    assert len(explained) == 1
    e = explained[0]
    assert (e["rank"], e["cause"], e["exception"], e["knock_on"]) == (1, "exception", "ValueError", [0])
    assert e["where"].endswith("in load_batch")
    wait = d.named("root_cause_wait")[0]
    assert wait["exited"] == [1] and 1 < wait["seconds"] < 5  # 4 s after the teardown, 1 s after rank 0 died
    # where the recovery's time went, phase by phase (a job without step lines has recovered at
    # its first collective seen: the relaunch runs past the daemon's look at 8 s)
    recovered = d.named("recovered")[0]
    assert list(recovered["phases"]) == list(PHASES)
    assert recovered["phases"]["diagnosis"] >= wait["seconds"]  # the wait for the root is part of it
    assert abs(sum(recovered["phases"].values()) - recovered["phases"]["detection"]
               - recovered["seconds"]) < 0.05


async def test_a_record_scripts_error_file_is_the_cause_even_with_nothing_on_stderr(daemon):
    d = await daemon(*FAST, "--max-restarts", "0",
                     command=[*FAULTS, "--steps", "60", "--record", "--quiet-stderr",
                              "--raise-rank", "1", "--raise-step", "5"])
    assert await d.finish(timeout=120) == 1
    e = d.named("failure_explained")[0]
    assert (e["rank"], e["source"], e["exception"], e["message"]) == (
        1, "error_file", "ValueError", "no batch 5: the shard's index is corrupt")
    assert e["where"].endswith("in load_batch")
    run = next(d.workdir.glob("run/diagnoses/*/attempt-0"))
    assert (run / "rank-1.error.json").is_file()


async def test_every_rank_raising_at_once_names_the_first_and_the_others_as_failed_too(daemon):
    d = await daemon(*FAST[2:], "--num-workers", "3", "--max-restarts", "0",
                     command=[*FAULTS, "--steps", "60", "--raise-rank", "-1", "--raise-step", "5"])
    assert await d.finish(timeout=120) == 1
    e = d.named("failure_explained")[0]
    first = d.named("state_changed", to="RECOVERING")[0]["reason"]
    assert first.startswith(f"rank {e['rank']} exited with 1: ValueError at ddp_faults.py:")
    assert e["exception"] == "ValueError" and e["knock_on"] == []
    assert sorted(e["also_failed"] + [e["rank"]]) == [0, 1, 2]  # each failed of its own cause
    assert d.named("root_cause_wait") == []  # the first failure was a root: no wait


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A child of this process's memory cgroup, capped at ``limit`` bytes. Our machines and CI
    run the suite as root on a kernel with the memory controller (v1 or v2): without them this
    test fails, saying which is missing, rather than pass without trying."""
    own = procfs.memory_cgroup(os.getpid())
    assert os.geteuid() == 0, "this test makes a memory cgroup: run the suite as root"
    assert own is not None, "no memory cgroup (v1 memory hierarchy or v2 memory controller) is mounted"
    child = Path(own) / f"sft-oom-{os.getpid()}"
    child.mkdir()
    try:
        v1 = (child / "memory.limit_in_bytes").exists()
        (child / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
        if v1 and (child / "memory.memsw.limit_in_bytes").exists():
            (child / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no way out by swap
        elif not v1 and (child / "memory.swap.max").exists():
            (child / "memory.swap.max").write_text("0")
    except BaseException:
        child.rmdir()
        raise
    try:
        yield child
    finally:
        with contextlib.suppress(OSError):
            child.rmdir()


async def test_a_rank_the_kernels_oom_killer_kills_is_oom(daemon):
    with memory_cgroup(1_500_000_000) as cgroup:
        join = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
        d = await daemon(*FAST, "--max-restarts", "0", wrap=join,
                         command=[*FAULTS, "--steps", "60", "--oom-rank", "1", "--oom-step", "10"])
        assert await d.finish(timeout=120) == 1
    e = d.named("failure_explained")[0]
    assert (e["rank"], e["cause"], e["source"], e["returncode"]) == (1, "oom", "cgroup", -9)
    assert "OOM" in d.named("state_changed", to="RECOVERING")[0]["reason"]


async def test_a_lightning_job_that_crashes_45_steps_after_each_resume_spends_its_budget_and_finishes(daemon):
    # attempts: 0 -> 45 (saved 20, 40), 40 -> 85 (60, 80), 80 -> 100, done
    d = await daemon(*FAST, "--max-restarts", "2",
                     command=[*LIGHTNING, "--steps", "100", "--devices", "2", "--save-every", "20",
                              "--crash-after", "45"])
    assert await d.finish(timeout=300) == 0
    assert d.named("state_changed", to="FAILED") == []
    assert d.events[-1]["restarts"] == 2
    for e in d.named("failure_explained"):
        assert (e["rank"], e["exception"]) == (1, "RuntimeError") and "after resuming" in e["message"]
    assert len({e["message"] for e in d.named("failure_explained")}) == 2  # further each time
