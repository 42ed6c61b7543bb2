"""Checkpoints that do not stall training, and the just-in-time save when a peer dies.

:meth:`AsyncCheckpointer.save` works the way DCP's ``async_save`` and torchtitan do: it waits for
the previous write (never two in flight), copies the state into tensors it keeps from save to save
(``copy_`` into warm memory: milliseconds, where writing and fsyncing takes seconds at 100M
parameters), and returns; a thread writes, fsyncs and renames the copy with
:func:`~supervisord_ft_worker.checkpoint.save_checkpoint`, so a file is named only once complete, exactly as a
blocking save. A write that failed is raised on the training thread by the next :meth:`check`,
:meth:`save` or :meth:`wait`.

:meth:`save_now` is the just-in-time save (see :class:`supervisord_ft_worker.contract.SaveOnFailure`): the write
in flight is finished if it holds the same step, else abandoned (it is not waited for, and its
temporary is never named), then the live state is written at once, first writer wins.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from supervisord_ft.checkpoints import checkpoint_path

from .checkpoint import SaveAbandoned, save_checkpoint

Write = Callable[..., Path]  # save_checkpoint's signature; tests pass a slower one
WRITER_NICE = 19  # the background writer gets the CPU training leaves idle, and little more


def snapshot(state: Any, into: Any = None) -> Any:
    """A copy of ``state`` that later training cannot change, reusing the tensors of ``into``
    (an earlier snapshot) where shapes and dtypes match: no allocation from the second save on."""
    if isinstance(state, torch.Tensor):
        if isinstance(into, torch.Tensor) and into.shape == state.shape and into.dtype == state.dtype:
            return into.copy_(state)
        return state.detach().clone()
    if isinstance(state, dict):
        old = into if isinstance(into, dict) else {}
        return {k: snapshot(v, old.get(k)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(state) else [None] * len(state)
        return type(state)(snapshot(v, o) for v, o in zip(state, old))
    return copy.deepcopy(state)


class WriteFailed(Exception):
    """The background write of ``step`` failed with ``error`` (the previous checkpoint stands)."""

    def __init__(self, step: int, error: BaseException) -> None:
        super().__init__(f"cannot save the checkpoint of step {step}: {error}")
        self.step = step
        self.error = error


class AsyncCheckpointer:
    """One rank's checkpoint writer: background saves, and the blocking just-in-time save."""

    def __init__(self, directory: Path | str, *, keep: int | None = None,
                 protect: Iterable[Path] | None = None, write: Write = save_checkpoint) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.protect = protect
        self._write = write
        self._buffer: Any = None
        self._thread: threading.Thread | None = None
        self._step = 0  # of the write in flight
        self._error: BaseException | None = None
        self._abandon = threading.Event()

    @property
    def in_flight(self) -> int | None:
        """The step being written in the background, or None."""
        return self._step if self._thread is not None and self._thread.is_alive() else None

    def save(self, state: dict[str, Any], step: int) -> float:
        """Snapshot ``state`` (of completed step ``step``) and write it in the background.
        Returns the seconds the snapshot took: what training is blocked for, but for a wait on
        the previous write."""
        self.wait()
        started = time.perf_counter()
        self._buffer = snapshot(state, self._buffer)
        copied = time.perf_counter() - started
        self._step, self._abandon = step, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._buffer, step, self._abandon),
                                        name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return copied

    def _run(self, state: dict[str, Any], step: int, abandon: threading.Event) -> None:
        # The write yields the CPU to training: where ranks use every core, a writer at the
        # same priority takes its seconds of CPU (torch's CRCs, the copy into the page cache)
        # out of the steps. Linux nices one thread; the just-in-time save (the training
        # thread's own) keeps its priority.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        try:
            self._write(state, step, self.directory, keep=self.keep, protect=self.protect, abandon=abandon)
        except BaseException as exc:  # handed to the training thread by _finish
            self._error = exc

    def check(self) -> None:
        """Raise :class:`WriteFailed` if the last background write failed; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self._finish()

    def wait(self) -> None:
        """Return once the write in flight is durable; :class:`WriteFailed` if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._finish()

    def _finish(self) -> None:
        self._thread = None
        error, self._error = self._error, None
        if error is not None and not isinstance(error, SaveAbandoned):
            raise WriteFailed(self._step, error) from error

    def abandon(self) -> None:
        """Give up the write in flight without waiting for it: once complete, its temporary is
        removed, never named (if the process exits first, a hidden temporary is left, which is
        never a candidate and is removed at the next launch)."""
        self._abandon.set()

    def save_now(self, state: dict[str, Any], step: int) -> Path:
        """The just-in-time save of ``state`` at ``step``: blocking, first writer of a step wins."""
        if self._thread is not None and self._step == step:
            self.wait()  # the write in flight is this very checkpoint
            return checkpoint_path(self.directory, step)
        self.abandon()
        return self._write(state, step, self.directory, keep=self.keep, protect=self.protect, exclusive=True)
