"""Restart rules for scripts that are not ours: crash loops are start-up failures only, and a
checkpoint the group cannot resume from is set aside for the next older one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from harness import FAKE_WORKER
from supervisord_ft.errors import EXIT_NO_REQUEUE
from supervisord_ft import checkpoints as ck

FAST = ["--grace-period", "0.3", "--restart-backoff", "0"]
PLAIN_LONG = [*FAKE_WORKER, "--plain", "--steps", "3000", "--step-time", "0.01"]


async def test_outside_sigkills_after_the_start_up_window_spend_budget_not_a_crash_loop(daemon):
    d = await daemon(*FAST, "--startup-window", "0.3", "--max-restarts", "5", command=PLAIN_LONG)
    for attempt in (0, 1):  # the same failure twice (SIGKILL, no stderr), each after 50 plain steps
        await d.wait_for(lambda e: e.get("line") == "step 50" and e["attempt"] == attempt and e["rank"] == 0)
        os.kill(d.named("worker_started", rank=attempt % 2, attempt=attempt)[0]["pid"], signal.SIGKILL)
    await d.wait_for(lambda e: e.get("line") == "step 5" and e["attempt"] == 2)
    d.signal(signal.SIGTERM)
    assert await d.finish() == 143
    assert d.named("state_changed", to="FAILED") == []
    assert d.events[-1]["restarts"] == 2


async def test_the_same_failure_twice_within_the_start_up_window_is_a_crash_loop(daemon):
    d = await daemon(*FAST, "--startup-window", "30", "--max-restarts", "5",
                     command=[*FAKE_WORKER, "--plain", "--fail-rank", "0", "--fail-at-step", "2",
                              "--fail-attempts", "99"])
    assert await d.finish() == EXIT_NO_REQUEUE
    assert len(d.named("launching")) == 2
    assert "crash loop" in d.named("state_changed", to="FAILED")[0]["reason"]


def save(directory: Path, step: int) -> Path:
    directory.mkdir(exist_ok=True)
    return ck.atomic_write(ck.checkpoint_path(directory, step),
                           lambda fh: torch.save({"step": step, "w": torch.zeros(4)}, fh))


async def test_a_checkpoint_the_group_cannot_resume_from_is_set_aside_for_the_older_one(daemon, tmp_path):
    save(tmp_path / "ckpt", 10)
    bad = save(tmp_path / "ckpt", 20)
    d = await daemon(*FAST, command=[*FAKE_WORKER, "--refuse-checkpoint", bad.name])
    assert await d.finish() == 0
    assert [e["resume_from"] for e in d.named("launching")] == [str(bad), str(bad),
                                                                 str(tmp_path / "ckpt" / "checkpoint_step_10.pt")]
    aside = d.named("checkpoint_set_aside")[0]
    assert aside["step"] == 20 and "not a state of this job" in aside["reason"]
    assert not bad.exists() and Path(aside["moved_to"]).exists()  # renamed, never deleted
    assert d.events[-1]["restarts"] == 1 and d.events[-1]["attempts"] == 3  # the fallback was free


async def test_when_the_older_checkpoint_fails_the_same_way_the_file_gets_its_name_back(daemon, tmp_path):
    save(tmp_path / "ckpt", 10)
    newest = save(tmp_path / "ckpt", 20)
    d = await daemon(*FAST, command=[*FAKE_WORKER, "--refuse-checkpoint", "any"])
    assert await d.finish() == EXIT_NO_REQUEUE
    assert "crash loop" in d.named("state_changed", to="FAILED")[0]["reason"]
    assert d.named("checkpoint_put_back")[0]["path"] == str(newest)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint_step_*")) == [
        "checkpoint_step_10.pt", "checkpoint_step_20.pt"]
