"""Structured logging: one structlog pipeline that writes every event to two sinks and a bus.

Each event is encoded once as strict JSON (:mod:`.jsonline`); that line goes to
``<run_dir>/events.jsonl`` (always JSON, for ``tail -f | jq``) and, for the json format, to stdout
as is. (The console format is a view, :mod:`.console`, fed by the bus.) Every event carries
``timestamp`` (ISO 8601, UTC), ``level`` and ``event`` first.

Supervision never depends on a sink: a failed write is counted here and never raised into the
loop. ``events.jsonl`` is the record of truth: each write is a whole line or nothing, and after
failed writes (a full or failing disk) a ``log_gap`` event says how many events are missing; a
thread of its own writes it, so a stalled file system never holds the loop.
Stdout is best effort (:class:`.stdio.StdoutWriter`): lines a slow reader has no room for are
dropped and a ``stdout_dropped`` event counts them; a reader that went away gets
``stdout_closed`` once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from .jsonline import encoder
from .stdio import EXIT_DRAIN_TIMEOUT
from .writer import LineFile, WriterThread, append_only

Subscriber = Callable[[dict[str, Any]], None]
EVENTS_FILE = "events.jsonl"  # in the run dir

_dumps = encoder(default=str)
_stamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
EVENTS_BUFFER_BYTES = 16 << 20  # events waiting for a stalled file system before they are lost
WRITE_BATCH_LINES = 4096  # queued lines written at once, whole or (a failed write) not at all
# A logging call's key that keeps its event off stdout (a worker stream redirected to a file, or
# a local rank filtered out); events.jsonl and the views still get it, without the key.
OFF_STDOUT = "off_stdout"


def now() -> str:
    """The time as events are stamped with it."""
    return _stamp(None, "", {})["timestamp"]


def notice(name: str, **fields: Any) -> dict[str, Any]:
    """One of the logging pipeline's own warnings, as an event."""
    return {"timestamp": now(), "level": "warning", "event": name, **fields}


class EventBus:
    """Where in-process views (console, metrics, sd_notify) observe every event the daemon logs.

    The loop only logs; views subscribe here instead of adding branches to the loop. A view
    receives each event as a dict (``timestamp``, ``level``, ``event`` and the fields) after it
    has been written. A view that raises is dropped and reported once on stderr: supervision
    never depends on a view.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.remove(subscriber)

    def publish(self, event: dict[str, Any]) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:  # a broken view must not take the loop down with it
                self._subscribers.remove(subscriber)
                print(f"supervisord-ft: view {subscriber!r} dropped after it raised {exc!r}",
                      file=sys.stderr)


class Stdout(Protocol):
    """Where stdout lines go: :class:`.stdio.StdoutWriter` (a test may pass its own)."""

    gone: str | None

    def isatty(self) -> bool: ...

    def write(self, line: str) -> bool: ...  # False: dropped, no room

    def close(self) -> int: ...  # the lines never written


class EventsFile(WriterThread):
    """``events.jsonl``, written by a thread of its own through a bounded buffer.

    A file system that stops taking writes (a dead NFS server, a frozen or failing disk) holds
    that thread only: :meth:`append` never blocks the loop; once :data:`EVENTS_BUFFER_BYTES`
    wait, later lines are lost and counted. Every line is written whole, or not at all: a disk
    that fills up mid-write takes part of a write (a short write) and then fails; that part is cut
    off again (the lines of that write are lost, and counted: lines are written in batches, one
    system call and one hand-over of the GIL for all that waited), so no reader ever meets half a JSON object (should even the cut fail, the next line
    starts on a fresh line). Lines lost either way are said in the file by a ``log_gap`` line
    before the next one written, and at once elsewhere by ``log_write_failed`` (:meth:`news`).
    """

    def __init__(self, path: Path, max_bytes: int = EVENTS_BUFFER_BYTES) -> None:
        super().__init__("events-writer")
        self.path = path
        self.max_bytes = max_bytes
        # A predecessor killed mid-write may have left no newline at the end.
        self._file = LineFile(append_only(path), _ends_a_line(path))
        # (a line, or the lines lost for want of room before it; its event's timestamp)
        self._queue: deque[tuple[bytes | Loss, str]] = deque()
        self._bytes = 0
        self._full: Loss | None = None  # lines lost for want of room since the last one queued
        self._loss: Loss | None = None  # lines the file refused since the last one written
        self._news: list[dict[str, Any]] = []  # notices for the loop to show
        self._writing = 0  # lines taken from the queue and being written
        self._thread.start()

    def append(self, line: str, timestamp: str) -> None:
        """Queue ``line`` (with its newline); when the buffer is full it is lost, and counted."""
        data = line.encode("utf-8", "replace")
        with self._cond:
            if self._closing:
                return
            if self._bytes + len(data) > self.max_bytes:
                if self._full is None:
                    self._full = Loss(f"{self.path}: no write completed while {self.max_bytes >> 10} KiB "
                                      f"of events waited (a stalled file system)", timestamp)
                    self._news.append(self._notice("log_write_failed", path=str(self.path),
                                                   reason=self._full.reason))
                self._full.add(timestamp)
                return
            if self._full is not None:  # the gap goes where the lost lines would have been
                self._queue.append((self._full, timestamp))
                self._full = None
            self._queue.append((data, timestamp))
            self._bytes += len(data)
            self._cond.notify()

    def news(self) -> list[dict[str, Any]]:
        """What the writer has to say since the last call: ``log_write_failed`` when lines begin
        to be lost, ``log_gap`` once the file has said how many were."""
        with self._cond:
            news, self._news = self._news, []
        return news

    def drain(self, timeout: float = EXIT_DRAIN_TIMEOUT) -> int:
        """Wait up to ``timeout`` for what is queued to be written; the lines still unwritten.
        Lines lost for want of room with no line after them are said at the end by their gap."""
        with self._cond:
            if self._full is not None:
                self._queue.append((self._full, self._full.last))
                self._full = None
                self._cond.notify()
            self._cond.wait_for(lambda: not self._queue and not self._writing, timeout)
            return len(self._queue) + self._writing

    def close(self, timeout: float = EXIT_DRAIN_TIMEOUT) -> None:
        """Let the thread write what is queued, for up to ``timeout``; then stop it."""
        if self._stop(timeout):  # else stuck in a write: the descriptor stays its own
            os.close(self._file.fd)

    def _lose(self, reason: str, timestamp: str) -> None:
        """(Holding the lock.) One more line the file refused; the first of a run is said at once."""
        if self._loss is None:
            self._loss = Loss(reason, timestamp)
            self._news.append(self._notice("log_write_failed", path=str(self.path), reason=reason))
        self._loss.add(timestamp)

    def _notice(self, name: str, **fields: Any) -> dict[str, Any]:
        return notice(name, **fields)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wait():
                    return
                item, first = self._queue.popleft()
                stamps = [first]
                if isinstance(item, bytes):  # with the lines queued behind it: one write, one
                    batch = [item]           # hand-over of the GIL, not one per line
                    self._bytes -= len(item)
                    while self._queue and isinstance(self._queue[0][0], bytes) \
                            and len(batch) < WRITE_BATCH_LINES:
                        data, stamp = self._queue.popleft()
                        batch.append(data)
                        stamps.append(stamp)
                        self._bytes -= len(data)
                    item = b"".join(batch)
                self._writing = len(stamps)
                refused, self._loss = self._loss, None
            said: list[dict[str, Any]] = []
            for loss in (refused, item if isinstance(item, Loss) else None):
                if loss is not None:
                    gap = self._notice("log_gap", **loss.fields())
                    if self._file.write((_dumps(gap) + "\n").encode()) is None:
                        said.append(gap)
                    else:
                        self._unsaid(loss)
            error = self._file.write(item) if isinstance(item, bytes) else None
            with self._cond:
                self._news += said
                if error is not None:
                    for stamp in stamps:
                        self._lose(f"{self.path}: {error.strerror or error}", stamp)
                self._writing = 0
                self._cond.notify_all()  # a drain waits for this

    def _unsaid(self, loss: Loss) -> None:
        """A gap the file did not take: said before the next line it takes, with any lost since."""
        with self._cond:
            if self._loss is not None:
                loss.lines += self._loss.lines
                loss.last = self._loss.last
            self._loss = loss


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


@dataclass
class Loss:
    """Lines one sink could not take, from the first to the last (event timestamps)."""

    reason: str
    first: str
    last: str = ""
    lines: int = 0

    def add(self, timestamp: str) -> None:
        self.lines += 1
        self.last = timestamp

    def fields(self) -> dict[str, Any]:
        return {"lines": self.lines, "first_lost": self.first, "last_lost": self.last,
                "reason": self.reason}


class _Renderer:
    """Last processor: encodes the event, writes it to every sink, publishes it on the bus.

    It writes itself and then drops the event, so structlog's logger never writes (or raises).
    """

    def __init__(self, events: EventsFile | None, stdout: Stdout | None,
                 bus: EventBus | None) -> None:
        self._events = events
        self._stdout = stdout
        self._bus = bus
        self._stdout_loss: Loss | None = None
        self._stdout_closed_said = False

    def __call__(self, _logger: Any, _name: str, ev: dict[str, Any]) -> Any:
        to_stdout = not ev.pop(OFF_STDOUT, False)
        self.emit({"timestamp": ev.pop("timestamp"), "level": ev.pop("level"),
                   "event": ev.pop("event"), **ev}, to_stdout=to_stdout)
        raise structlog.DropEvent

    def emit(self, event: dict[str, Any], to_file: bool = True, to_stdout: bool = True) -> None:
        if self._events is not None:
            for said in self._events.news():  # the file has its log_gap; log_write_failed cannot
                self.emit(said, to_file=False)
        stdout = self._stdout if to_stdout else None
        if stdout is not None and not self._stdout_ready(stdout):
            stdout = None
        line = _dumps(event) + "\n"
        if to_file and self._events is not None:
            self._to_file(line, event["timestamp"])
        if self._bus is not None:
            self._bus.publish(event)
        if stdout is not None and (self._stdout_loss is not None
                                   or not stdout.write(line)):
            self._stdout_loss = self._stdout_loss or Loss(
                "stdout reader too slow: buffer full", event["timestamp"])
            self._stdout_loss.add(event["timestamp"])

    def close(self) -> None:
        """Let the file and stdout's reader take what is queued (bounded); say what each never got."""
        unwritten = self._events.drain() if self._events is not None else 0
        if unwritten:  # said where it still can be: stdout, the console
            self.emit(self._notice("log_write_failed", path=str(self._events.path),  # type: ignore[union-attr]
                                   reason=f"{unwritten} events still unwritten at exit: the file system "
                                          f"took no write within {EXIT_DRAIN_TIMEOUT:g} s"), to_file=False)
        left = 0
        if (stdout := self._stdout) is not None:
            self._stdout_ready(stdout)  # a pending notice goes out first, or stdout_closed is said
            left = stdout.close()
        loss = self._stdout_loss
        if left:
            loss = loss or Loss("stdout reader too slow at exit", self._now())
            loss.lines += left
            loss.last = self._now()
        if loss is not None:
            self.emit(self._notice("stdout_dropped", **loss.fields()), to_stdout=False)
        if self._events is not None:
            self._events.close(0 if unwritten else EXIT_DRAIN_TIMEOUT)

    def _notice(self, name: str, **fields: Any) -> dict[str, Any]:
        return notice(name, **fields)

    def _now(self) -> str:
        return now()

    def _to_file(self, line: str, timestamp: str) -> None:
        assert self._events is not None
        self._events.append(line, timestamp)

    def _stdout_ready(self, stdout: Stdout) -> bool:
        """Say what stdout missed before the next event goes there; False once it is gone."""
        if stdout.gone is not None:
            if not self._stdout_closed_said:
                self._stdout_closed_said = True
                self.emit(self._notice("stdout_closed", reason=stdout.gone), to_stdout=False)
            return False
        if (loss := self._stdout_loss) is not None:
            notice = self._notice("stdout_dropped", **loss.fields())
            if stdout.write(_dumps(notice) + "\n"):
                self._stdout_loss = None
                self.emit(notice, to_stdout=False)  # in every sink at the same place
        return True


def resolve_format(fmt: str, stdout: Stdout | None) -> str:
    """``auto`` means console when stdout is a terminal (a person watching), else json."""
    if fmt != "auto":
        return fmt
    return "console" if stdout is not None and stdout.isatty() else "json"


class Log:
    """The daemon's logger (:attr:`logger`) and the sinks behind it; :meth:`close` once at exit."""

    def __init__(self, events: EventsFile | None, stdout: Stdout | None = None,
                 bus: EventBus | None = None, context: Mapping[str, Any] | None = None) -> None:
        """``stdout`` gets every event as a JSON line; None when the console view has it.
        ``context``: fields every event gets, as they are when it is logged (a multi-node
        daemon's node rank and round, which its rendezvous updates)."""
        self._renderer = _Renderer(events, stdout, bus)
        where = context if context is not None else {}
        self.logger: Any = structlog.wrap_logger(
            structlog.ReturnLogger(),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
                lambda _logger, _name, ev: {**where, **ev},
                self._renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            cache_logger_on_first_use=True,
        )

    def close(self) -> None:
        self._renderer.close()
