"""The daemon's own standard streams: never missing, and stdout never on the training's path.

A daemonizer or CI runner may start us with descriptor 0, 1 or 2 closed; the first pipe or socket
we open would then take its number (a worker's pipe becoming "stdout"). :func:`reopen_closed`
puts ``/dev/null`` there first, as daemons do.

Stdout is whatever the user piped us into: a paused ``less``, a stalled log shipper, a ``head``
that exits. :class:`StdoutWriter` writes it from a thread of its own, through a bounded buffer, so
the event loop never waits for the reader. A thread rather than ``O_NONBLOCK``: that flag belongs
to the open file description, which we share with the shell, the terminal and any sibling
writing to the same pipe, so setting it would make *their* writes fail with EAGAIN; and a socket
(journald) cannot be reopened privately. The thread does plain blocking writes to any kind of
file.
"""

from __future__ import annotations

import os
import select
import sys
from collections import deque

from .writer import WriterThread

STDOUT_BUFFER_BYTES = 4 << 20
# What the daemon waits at exit for a slow reader to take the buffered lines; then they are lost
# (events.jsonl has them) and the process exits anyway.
EXIT_DRAIN_TIMEOUT = 2.0


def reopen_closed() -> None:
    """Open ``/dev/null`` on each of descriptors 0, 1, 2 that is closed; rebuild ``sys.std*``."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: ``fd`` itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    # Python leaves these None when their descriptor was closed at start-up.
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)


class StdoutWriter(WriterThread):
    """Lines for a descriptor, queued by the event loop and written by a thread.

    :meth:`write` never blocks: it returns False (the line is dropped) when ``max_bytes`` are
    already waiting for a slow reader. When the descriptor fails (EPIPE: the reader went away)
    the thread says so once on stderr, sets :attr:`gone` and everything later is discarded.
    """

    def __init__(self, fd: int = 1, max_bytes: int = STDOUT_BUFFER_BYTES) -> None:
        super().__init__(f"fd{fd}-writer")
        self.fd = fd
        self.max_bytes = max_bytes
        self.gone: str | None = None  # why writes stopped, once they have
        self._queue: deque[bytes] = deque()
        self._bytes = 0  # queued or being written
        self._lines = 0
        self._thread.start()

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def write(self, line: str) -> bool:
        """Queue ``line`` (with its newline); False when it was dropped for want of room."""
        data = line.encode("utf-8", "replace")
        with self._cond:
            if self.gone is not None or self._closing:
                return True  # nothing more goes out; that was said once already
            if self._bytes + len(data) > self.max_bytes:
                return False
            self._queue.append(data)
            self._bytes += len(data)
            self._lines += 1
            self._cond.notify()
        return True

    def close(self, timeout: float = EXIT_DRAIN_TIMEOUT) -> int:
        """Let the thread write what is queued for up to ``timeout``; return the lines left over."""
        self._stop(timeout)
        with self._cond:
            return 0 if self.gone is not None else self._lines

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wait():
                    return
                lines, batch = len(self._queue), b"".join(self._queue)
                self._queue.clear()
            try:
                self._write_all(batch)
            except OSError as exc:
                with self._cond:
                    self.gone = f"{exc.strerror or exc} (errno {exc.errno})"
                    self._queue.clear()
                    self._bytes = self._lines = 0
                _say(f"supervisord-ft: stdout failed: {self.gone}; no more events there, "
                     f"events.jsonl still gets every one\n")
                return
            with self._cond:
                self._bytes -= len(batch)
                self._lines -= lines

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # someone else set O_NONBLOCK on the shared description
                select.select([], [self.fd], [])


def _say(text: str) -> None:
    """One line on stderr from the writer thread; stderr may be gone too (``2>&1 | head``)."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass
