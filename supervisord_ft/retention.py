"""``keep_checkpoints`` applied as checkpoints appear, for any job, not only at a recovery.

The daemon watches the checkpoint directory with inotify (the kernel says when a name is created,
renamed into place or closed after writing; nothing polls) and, when a checkpoint name is among
them, prunes in a thread of its own: a slow or hung file system never holds the loop, and one
prune runs at a time (names that land meanwhile get one more after it). What goes is
:func:`checkpoints.prune`'s rule: only files older than the ``keep``-th newest intact one, and
never the file the running attempt resumed from; a file still being written is not intact, so
it neither counts nor goes. Where inotify is unavailable the daemon says so, and old files go at
recoveries and at the end only.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import blocking, checkpoints, tasks
from .errors import CheckpointError

_libc = ctypes.CDLL(None, use_errno=True)
# <sys/inotify.h>: a name created (os.link: an exclusive atomic write), renamed in (os.replace),
# closed after writing (torch.save straight to the final name); the queue overflowed.
_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE, _IN_Q_OVERFLOW = 0x8, 0x80, 0x100, 0x4000
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
WATCH_TIMEOUT = 5.0  # a directory that cannot be looked up in this long is not watched


def prune(directory: Path, keep: int, protect: Iterable[Path], log: Any) -> None:
    """:func:`checkpoints.prune`, each removal logged; a failure is said, never raised (the old
    files stay: nothing is lost). Blocks: for the loop only while no worker runs."""
    _say(log, *_prune(directory, keep, protect))


def _prune(directory: Path, keep: int, protect: Iterable[Path]) -> tuple[list[Path], str | None]:
    try:
        return checkpoints.prune(directory, keep, protect), None
    except (OSError, CheckpointError) as exc:
        return [], str(exc)


def _say(log: Any, removed: list[Path], error: str | None) -> None:
    for path in removed:
        log.info("checkpoint_pruned", path=str(path))
    if error is not None:
        log.warning("checkpoint_prune_failed", reason=error)


class Retention:
    """Prunes ``directory`` to ``keep`` checkpoints whenever one appears, from :meth:`start` to
    :meth:`close`. The loop says which file the running attempt resumed from (:meth:`follow`)."""

    def __init__(self, directory: Path, keep: int, log: Any) -> None:
        self.directory = directory
        self.keep = keep
        self.log = log
        self._protect: list[Path] = []
        self._tidy = False  # multi-node: one node prunes the shared directory
        self._fd: int | None = None
        self._pruning: asyncio.Task[None] | None = None
        self._again = False

    async def start(self) -> None:
        try:
            async with asyncio.timeout(WATCH_TIMEOUT):
                self._fd = await blocking.in_thread(lambda: _watch(self.directory), "checkpoint-watch")
        except (OSError, TimeoutError) as exc:
            self.log.warning("checkpoint_watch_unavailable", path=str(self.directory),
                             reason=getattr(exc, "strerror", None) or str(exc) or f"no answer in {WATCH_TIMEOUT:g} s",
                             action="old checkpoints are pruned at recoveries and at the end only")
            return
        asyncio.get_running_loop().add_reader(self._fd, self._on_events)

    def follow(self, resume_from: Path | None, tidy: bool) -> None:
        """A new attempt runs: ``resume_from`` is never pruned while it does; ``tidy``: this
        daemon prunes (False on every node of a group but one)."""
        self._protect = [resume_from] if resume_from is not None else []
        self._tidy = tidy

    async def finish(self, timeout: float) -> None:
        """The job is done: prune once more with nothing protected, waiting at most ``timeout``."""
        self._protect = []
        self._kick()
        if self._pruning is not None:
            await asyncio.wait({self._pruning}, timeout=timeout)

    def close(self) -> None:
        if self._pruning is not None:  # only one stuck in a hung file system is still running
            self._pruning.cancel()
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def _on_events(self) -> None:
        assert self._fd is not None
        try:
            buf = b"".join(iter(lambda: _read(self._fd), b""))  # type: ignore[arg-type]
        except OSError as exc:
            self.log.warning("checkpoint_watch_unavailable", path=str(self.directory), reason=str(exc),
                             action="old checkpoints are pruned at recoveries and at the end only")
            self.close()
            return
        if any(mask & _IN_Q_OVERFLOW or checkpoints.parse_step(name) is not None for mask, name in _events(buf)):
            self._kick()

    def _kick(self) -> None:
        if not self._tidy:
            return
        if self._pruning is not None and not self._pruning.done():
            self._again = True
            return
        self._pruning = tasks.start("checkpoint-pruner", self._prune_until_settled, self.log)

    async def _prune_until_settled(self) -> None:
        # Unbounded on purpose: a prune stuck in a hung file system holds this task, not the
        # loop, and no second thread piles up behind it; finish() bounds its own wait.
        self._again = True
        while self._again:
            self._again = False
            _say(self.log, *await blocking.in_thread(
                lambda: _prune(self.directory, self.keep, self._protect), "checkpoint-pruner"))


def _watch(directory: Path) -> int:
    fd = _checked(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        _checked(_libc.inotify_add_watch(fd, os.fsencode(directory), _MASK))
    except OSError:
        os.close(fd)
        raise
    return fd


def _checked(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _events(buf: bytes) -> Iterator[tuple[int, str]]:
    """(mask, name) of each event in ``buf``, as read from an inotify descriptor."""
    offset = 0
    while offset + _EVENT.size <= len(buf):
        _, mask, _, length = _EVENT.unpack_from(buf, offset)
        offset += _EVENT.size
        yield mask, buf[offset:offset + length].rstrip(b"\0").decode(errors="replace")
        offset += length
