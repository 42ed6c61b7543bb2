"""Background checkpoint saves: training goes on during the write, never two in flight, an
abandoned or failed write never gets a final name."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch

from supervisord_ft.checkpoints import checkpoint_path
from supervisord_ft_worker.async_checkpoint import AsyncCheckpointer, WriteFailed
from supervisord_ft_worker.checkpoint import load_checkpoint, save_checkpoint

TIMEOUT_S = 30


class SlowDisk:
    """A write hook: each background write waits for :attr:`release` (a slow filesystem), and
    the hook records how many were in flight at once. Just-in-time writes pass straight through."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.active = self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, state, step, directory, **kwargs) -> Path:
        if kwargs.get("exclusive"):
            return save_checkpoint(state, step, directory, **kwargs)
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.started.release()
        try:
            abandon = kwargs.get("abandon")
            for _ in range(TIMEOUT_S * 100):  # bounded: a blocking save() would never release it
                if self.release.wait(0.01) or (abandon is not None and abandon.is_set()):
                    break  # an abandoned write stops at its first chunk, in save_checkpoint
            else:
                raise TimeoutError("the slow disk was never released")
            return save_checkpoint(state, step, directory, **kwargs)
        finally:
            with self._lock:
                self.active -= 1


def state(value: float) -> dict:
    return {"w": torch.full((1000,), value), "step": int(value)}


def test_save_returns_while_the_write_is_blocked_and_writes_the_state_as_it_was(tmp_path):
    disk = SlowDisk()
    saver = AsyncCheckpointer(tmp_path, keep=3, protect=[], write=disk)
    live = state(1.0)
    saver.save(live, 1)  # returns although the disk does not move
    assert disk.started.acquire(timeout=TIMEOUT_S) and saver.in_flight == 1
    live["w"].fill_(2.0)  # training goes on and changes the live tensors
    assert not checkpoint_path(tmp_path, 1).exists()
    disk.release.set()
    saver.wait()
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["w"].eq(1.0).all()


def writing_step_1(tmp_path):
    """A checkpointer whose write of step 1 is under way, held by a slow disk."""
    disk = SlowDisk()
    saver = AsyncCheckpointer(tmp_path, keep=3, protect=[], write=disk)
    saver.save(state(1.0), 1)
    assert disk.started.acquire(timeout=TIMEOUT_S)
    return disk, saver


def test_never_two_saves_in_flight_and_the_buffer_is_reused(tmp_path):
    disk, saver = writing_step_1(tmp_path)
    first_buffer = saver._buffer["w"]
    second = threading.Thread(target=saver.save, args=(state(2.0), 2))
    second.start()
    assert not disk.started.acquire(timeout=0.5)  # the second write has not begun
    disk.release.set()
    second.join(TIMEOUT_S)
    saver.wait()
    assert disk.most_active == 1
    assert saver._buffer["w"] is first_buffer  # copied into, not reallocated
    assert load_checkpoint(checkpoint_path(tmp_path, 2))["w"].eq(2.0).all()


def test_a_just_in_time_save_abandons_an_older_write_which_never_gets_a_name(tmp_path):
    disk, saver = writing_step_1(tmp_path)
    saver.save_now(state(2.0), 2)  # abandons step 1, writes step 2 at once
    assert checkpoint_path(tmp_path, 2).is_file()
    saver.wait()  # the abandoned write ends; no error
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step_2.pt"]  # no temporary either


def test_a_just_in_time_save_of_the_step_in_flight_finishes_that_write(tmp_path):
    disk, saver = writing_step_1(tmp_path)
    disk.release.set()
    assert saver.save_now(state(9.0), 1) == checkpoint_path(tmp_path, 1)
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["w"].eq(1.0).all()


def test_a_failed_background_write_is_raised_on_the_training_thread(tmp_path):
    def full_disk(state, step, directory, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    saver = AsyncCheckpointer(tmp_path, keep=3, protect=[], write=full_disk)
    saver.save(state(1.0), 1)
    with pytest.raises(WriteFailed, match="step 1") as failed:
        saver.wait()
    assert failed.value.step == 1 and failed.value.error.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
