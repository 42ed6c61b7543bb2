"""One daemon per checkpoint directory: a second one is refused before it starts anything."""

from __future__ import annotations

import os
import signal

from harness import FAKE_WORKER

from supervisord_ft.dirlock import LOCK_NAME

LONG = ["--steps", "2000", "--step-time", "0.01"]


async def test_a_second_daemon_on_the_same_checkpoint_dir_exits_2_naming_the_holder(daemon, tmp_path):
    first = await daemon(command=[*FAKE_WORKER, *LONG])
    await first.wait_for(lambda e: e["event"] == "state_changed" and e["to"] == "RUNNING")
    second = await daemon("--run-dir", str(tmp_path / "run2"), command=[*FAKE_WORKER, *LONG])
    assert await second.finish(timeout=10) == 2
    assert second.events == [] and not (tmp_path / "run2" / "events.jsonl").exists()
    assert second.stderr.count("\n") == 1
    assert str(tmp_path / "ckpt") in second.stderr and f"pid {first.proc.pid}" in second.stderr
    lock = str(tmp_path / "ckpt" / LOCK_NAME)
    for pid in first.worker_pids():  # workers do not inherit the lock
        assert lock not in [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert first.proc.returncode is None  # the holder runs on, untouched
    first.signal(signal.SIGTERM)
    assert await first.finish() == 143


async def test_the_lock_is_released_at_exit_and_its_file_is_never_taken_for_a_checkpoint(daemon):
    assert await (await daemon(command=[*FAKE_WORKER, "--steps", "1"])).finish() == 0
    again = await daemon(command=[*FAKE_WORKER, "--steps", "1"])
    assert await again.finish() == 0
    assert again.named("checkpoint_rejected") == []
    assert again.named("checkpoint_selected")[0]["path"] is None
