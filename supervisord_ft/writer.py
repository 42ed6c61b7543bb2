"""Writing off the loop: the thread every writer of the daemon's runs on, and whole-line writes.

Stdout (:class:`.stdio.StdoutWriter`), ``events.jsonl`` (:class:`.logs.EventsFile`) and the
per-rank log files (:mod:`.ranklogs`) are each written by a thread of their own, so a slow reader
or a stalled file system holds that thread, never the event loop or a rank. Each keeps its own
queue and bound; :class:`WriterThread` is what they share: the lock, the wait for work, and a
stop that lets the thread finish what is queued, within a bound.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sized
from pathlib import Path


class WriterThread:
    """A writer's thread. A subclass sets ``_queue``, starts ``_thread`` at the end of its
    ``__init__``, and in its ``_run`` takes work under ``_cond`` while :meth:`_wait` says so."""

    _queue: Sized

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def _wait(self) -> bool:
        """(In the thread, holding the lock.) Wait until something is queued; False once the
        writer is closing and nothing is left."""
        while not self._queue and not self._closing:
            self._cond.wait()
        return bool(self._queue)

    def _stop(self, timeout: float) -> bool:
        """Let the thread write what is queued, for up to ``timeout``; whether it ended (else it
        is stuck in a write, and what it holds stays its own)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()


def append_only(path: Path) -> int:
    """A descriptor that appends to ``path``, created if missing; not inherited by workers."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class LineFile:
    """A descriptor that takes whole lines or nothing: a disk that fills up mid-write takes part
    of it (a short write) and then fails; that part is cut off again, so no reader meets half a
    line (should even the cut fail, the next write starts on a fresh line)."""

    def __init__(self, fd: int, at_line_start: bool = True) -> None:
        self.fd = fd
        self._at_line_start = at_line_start

    def write(self, data: bytes) -> OSError | None:
        """Write ``data`` whole; the error when it could not be, with any part written cut off."""
        if not self._at_line_start:
            data = b"\n" + data
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                written += os.write(self.fd, view[written:])
        except OSError as exc:
            if written:
                self._cut(written, data[written - 1:written] == b"\n")
            return exc
        self._at_line_start = True
        return None

    def _cut(self, written: int, ends_a_line: bool) -> None:
        try:
            os.ftruncate(self.fd, os.lseek(self.fd, 0, os.SEEK_END) - written)
        except OSError:
            self._at_line_start = ends_a_line
