"""Worker output → log events, without ever letting a worker block on a full pipe, or letting a
line it prints break or forge the log.

Each pipe is read by the loop itself (a :class:`Pipe` protocol), as fast as the kernel delivers:
each chunk counts as liveness (a progress bar that never ends a line is alive) and is split into
lines at once (cheap C-level work); one emitter task turns lines into ``worker_output`` events.
The pipes and the emitter are joined by a backlog bounded in bytes: when the emitter falls
behind a flood, new lines are dropped and counted, and a ``worker_output_dropped`` event reports
how many. A line longer than ``max_line_bytes`` is cut there and marked ``truncated``; the rest
of it is discarded without being buffered. Bytes that are not UTF-8 are replaced, never fatal.

A line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r``. A line ended by a lone ``\\r`` is a redraw
(tqdm and the like): the first one is logged, then at most one each ``REDRAW_INTERVAL`` per pipe,
and the others are skipped uncounted; a bar's final state, ended by ``\\n``, is always logged.

A line that is a JSON object has its keys merged into the event, and a key the daemon's own
events use is renamed ``worker_<key>``, so a worker can neither forge a daemon field nor collide
with the logging call. An object nested deeper than ``MAX_DEPTH`` is logged as ``line`` text.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import math
import os
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .logs import OFF_STDOUT

MAX_BACKLOG_BYTES = 16 << 20
# What a queued line costs beyond its bytes (bytes object, tuple, deque slot): counted against
# MAX_BACKLOG_BYTES, or a flood of short lines would hold several times the budget.
LINE_OVERHEAD = 160
# Lines emitted before yielding to the pipes' reads. Small, because a read is cheap and keeps the
# workers' pipes drained while the daemon is short of CPU (BENCHMARKS.md §6).
EMIT_BATCH = 64
# A pipe that delivered this much at once has more waiting: it is read again only at the next
# turn of the loop, after everything else ready (the event loop would otherwise read a flood
# many chunks in a row, seconds of splitting per turn, with exits, signals and recovery waiting).
FAIR_CHUNK = 32 << 10
REDRAW_INTERVAL = 1.0  # seconds between two logged redraws of one pipe
# Drops are reported once the backlog empties, and at least this often while it never does (a
# flood the daemon cannot keep up with: 1,024 ranks printing 10 lines a second each).
DROP_REPORT_EVERY = 5.0
# Far deeper than any log record, far shallower than the encoder's recursion limit (~1000).
MAX_DEPTH = 32
TRACEBACK_HEADER = b"Traceback (most recent call last):"
# The keys of a worker's JSON object that are logged as worker_<key>: the logging call's own
# parameters, the fields every event gets, and every field of the daemon's own events
# (tests/test_output.py checks this against every log call in the package).
RESERVED = frozenset({
    "self", "method_name", "event", "timestamp", "level", "run_id",
    "rank", "restart", "attempt", "stream", "line", "truncated", "lines", "reason",
    "pid", "python", "loop", "config", "state", "restarts", "exit_code", "from", "to",
    "alive", "output_lines", "daemon_max_rss_kb", "daemon_open_fds", "master_addr",
    "master_port", "num_workers", "resume_from", "path", "step", "seconds", "silent_for",
    "before_first_step", "returncode", "runtime", "signal", "why", "terminated", "killed",
    "ranks", "attempts", "groups", "moved_to", "pids", "skipped", "host", "first_lost",
    "last_lost", "agent_store", "standby_pid", "preload", "modules", "addr", "port", "host_pid",
    "mtime", "timeout", "exited_on_their_own", "still_alive",
    # hangs: the learnt limit, the channel, the diagnosis
    "cap", "longest_interval", "samples", "judged_by", "laggards", "summary", "stacks", "frames",
    "unanswered", "stacks_error",
    # a failure explained, and where its recovery's time went
    "cause", "exception", "where", "message", "source", "knock_on", "also_failed", "notes",
    "exited", "phases",
    # the store host lost after the ranks met; a background task's bug
    "action", "task", "failures",
    # a torchrun option that means nothing here
    "option", "value",
    # the modules a standby learnt to import
    "total", "packages", "learnt", "rss_mib",
    # multi-node: the context every event gets, and the rendezvous' own events
    "node_rank", "round", "endpoint", "rdzv_id", "local_addr", "nnodes", "local_world_size",
    "world_size", "rank_offset", "votes",
    # per-rank log files: the attempt's folder; the logging call's key for an event kept off stdout
    "logs", OFF_STDOUT,
    # the open files limit raised at start
    "before", "after", "needed",
})


@dataclass(frozen=True, eq=True)
class Source:
    """One pipe of one worker of one launch attempt."""

    rank: int
    attempt: int
    stream: str  # "stdout" or "stderr"
    log: Any = field(compare=False, hash=False)  # bound with rank, restart and attempt
    shown: bool = field(default=True, compare=False, hash=False)  # False: off the daemon's stdout


class LineSplitter:
    """Cuts one pipe's chunks into lines and hands each kept one to ``emit(raw, truncated)``.

    Holds at most ``limit`` bytes of an unfinished line. A chunk that ends in ``\\r`` leaves its
    line held until the next chunk says whether a ``\\n`` follows (CRLF) or not (a redraw).
    """

    def __init__(self, limit: int, emit: Callable[[bytes, bool], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.emit = emit
        self.clock = clock
        self._partial = bytearray()
        self._discarding = False  # inside an over-long line, until its end
        self._after_cr = False
        self._held: tuple[bytes, bool] | None = None
        self._last_redraw = -math.inf

    def feed(self, chunk: bytes) -> None:
        start, end = 0, len(chunk)
        if self._after_cr:
            self._after_cr = False
            crlf = chunk.startswith(b"\n")
            if self._held is not None:
                self._line(*self._held, redraw=not crlf)
                self._held = None
            start = int(crlf)
        emit, limit = self.emit, self.limit
        nl = cr = -1  # next \n and \r at or after start; end when there is none
        while True:
            if nl < start:
                nl = _find(chunk, b"\n", start)
            if cr < start:
                cr = _find(chunk, b"\r", start)
            if nl < cr:
                if self._partial or self._discarding:
                    if (line := self._cut(chunk, start, nl)) is not None:
                        emit(*line)
                else:  # the common case, kept to a slice and a call
                    emit(chunk[start:min(nl, start + limit)], nl - start > limit)
                start = nl + 1
            elif cr + 1 < end:
                crlf = chunk[cr + 1] == 0x0A
                if (line := self._cut(chunk, start, cr)) is not None:
                    self._line(*line, redraw=not crlf)
                start = cr + 1 + crlf
            elif cr + 1 == end:  # \n or not: the next chunk tells
                self._held = self._cut(chunk, start, cr)
                self._after_cr = True
                return
            else:
                break
        if not self._discarding and start < end:
            self._partial += chunk[start:]
            if len(self._partial) > self.limit:
                self.emit(bytes(self._partial[:self.limit]), True)
                self._partial.clear()
                self._discarding = True

    def close(self) -> None:
        """End of the pipe: what is left is a last line."""
        if self._held is not None:
            self.emit(*self._held)
        elif self._partial:
            self.emit(bytes(self._partial), False)
        self._held, self._partial = None, bytearray()

    def _cut(self, chunk: bytes, start: int, eol: int) -> tuple[bytes, bool] | None:
        """The line ending at ``eol``, cut at ``limit``; None for the end of a line already cut."""
        if self._discarding:
            self._discarding = False
            return None
        if self._partial:
            self._partial += chunk[start:eol]
            line = bytes(self._partial[:self.limit]), len(self._partial) > self.limit
            self._partial.clear()
            return line
        return chunk[start:min(eol, start + self.limit)], eol - start > self.limit

    def _line(self, raw: bytes, truncated: bool, redraw: bool) -> None:
        if redraw:
            now = self.clock()
            if not raw or now - self._last_redraw < REDRAW_INTERVAL:
                return
            self._last_redraw = now
        self.emit(raw, truncated)


class Pipe(asyncio.Protocol):
    """One worker pipe, split into lines as the loop reads it.

    No buffer lies between the kernel and the splitter, so once the writer has exited, "all it
    wrote has been read" is the kernel's count of unread bytes reaching 0: a grandchild that
    inherited the pipe and holds it open does not delay the worker's exit (EOF would).
    """

    def __init__(self, router: OutputRouter, source: Source, fd: int) -> None:
        self._on_bytes = router.on_bytes
        self._source = source
        self._fd = fd
        self._lines = LineSplitter(router.max_line, functools.partial(router._push, source))
        self._transport: asyncio.BaseTransport | None = None
        self._writer_gone = False
        self._closed = False
        self.read_out = asyncio.Event()  # closed, or nothing unread once the writer is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._on_bytes is not None:
            self._on_bytes(self._source, data)
        self._lines.feed(data)
        if self._writer_gone and self._unread() == 0:
            self.read_out.set()
        elif len(data) >= FAIR_CHUNK and self._transport is not None and not self._closed:
            self._transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        if not self._closed and self._transport is not None:
            self._transport.resume_reading()  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.close()  # before the transport closes the descriptor that _unread asks about
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def writer_exited(self) -> None:
        """The worker is gone: what it wrote is in the pipe now, and no more of it comes. It is
        read at once (up to the pipe's size), not a chunk per turn of a loop that other ranks'
        floods keep busy: the exit waits for it (a SIGKILL under a flood was seen 0.75 s late)."""
        self._writer_gone = True
        left = self._unread()
        while left > 0 and not self._closed:
            try:
                data = os.read(self._fd, left)
            except OSError:  # EAGAIN: a grandchild holding the pipe read it first; or closed
                break
            if not data:
                break
            left -= len(data)
            self.data_received(data)
        if self._unread() == 0:
            self.read_out.set()

    def close(self) -> None:
        """Stop reading; what is left of an unfinished line is a last line."""
        if self._closed:
            return
        self._closed = True
        self._lines.close()
        if self._transport is not None:
            self._transport.close()  # closes the descriptor too
        self.read_out.set()

    def _unread(self) -> int:
        if self._closed:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(self._fd, termios.FIONREAD, bytes(4)), "little")
        except OSError:
            return 0


class OutputRouter:
    """Owns the backlog and the emitter.

    ``on_bytes(source, data)`` runs for every chunk read (liveness, and the bytes as the worker
    wrote them for its log files); ``on_line(source, raw)`` for
    every line kept, dropped from the backlog or not; ``on_json(source, fields)`` in the emitter
    for every line that is a JSON object, with the worker's keys as it wrote them.
    """

    def __init__(self, max_line_bytes: int, on_line: Callable[[Source, bytes], None] | None = None,
                 on_json: Callable[[Source, dict[str, Any]], None] | None = None,
                 max_backlog_bytes: int = MAX_BACKLOG_BYTES,
                 on_bytes: Callable[[Source, bytes], None] | None = None) -> None:
        self.max_line = max_line_bytes
        self.max_backlog = max_backlog_bytes
        self.on_bytes = on_bytes
        self.on_line = on_line
        self.on_json = on_json
        self._backlog: deque[tuple[Source, bytes, bool]] = deque()
        self._backlog_bytes = 0
        self._dropped: dict[Source, int] = {}
        self._drops_reported = time.monotonic()
        self._in_traceback: set[Source] = set()  # stderr pipes in the middle of a traceback
        self._ready = asyncio.Event()
        self.lines = 0

    async def connect(self, source: Source, fd: int) -> Pipe:
        """Read the pipe ``fd`` (the receiver owns it from now on) as ``source``."""
        file = os.fdopen(fd, "rb", 0)
        try:
            _, pipe = await asyncio.get_running_loop().connect_read_pipe(
                lambda: Pipe(self, source, fd), file)
        except BaseException:
            file.close()
            raise
        return pipe

    def _push(self, source: Source, raw: bytes, truncated: bool) -> None:
        if self.on_line is not None:
            self.on_line(source, raw)
        cost = len(raw) + LINE_OVERHEAD
        if self._backlog_bytes + cost > self.max_backlog:
            self._dropped[source] = self._dropped.get(source, 0) + 1
            return
        self._backlog.append((source, raw, truncated))
        self._backlog_bytes += cost
        self._ready.set()

    async def run(self) -> None:
        """The emitter: runs until cancelled."""
        while True:
            if not self._backlog:  # (run again after a failure: what is left goes first)
                self._ready.clear()
                await self._ready.wait()
            self.flush(EMIT_BATCH)
            await asyncio.sleep(0)

    def flush(self, limit: int | None = None) -> None:
        """Emit up to ``limit`` pending lines now (all when None), then report drops (once the
        backlog is empty, or DROP_REPORT_EVERY after the last report)."""
        n = 0
        while self._backlog and (limit is None or n < limit):
            source, raw, truncated = self._backlog.popleft()
            self._backlog_bytes -= len(raw) + LINE_OVERHEAD
            fields = _emit(source, raw, truncated, self._traceback_level(source, raw))
            if fields is not None and self.on_json is not None:
                self.on_json(source, fields)
            n += 1
        self.lines += n
        now = time.monotonic()
        if self._dropped and (not self._backlog or now - self._drops_reported >= DROP_REPORT_EVERY):
            self._drops_reported = now
            for source, count in self._dropped.items():
                source.log.warning("worker_output_dropped", stream=source.stream, lines=count,
                                   reason="output faster than the daemon can log it")
            self._dropped.clear()

    def _traceback_level(self, source: Source, raw: bytes) -> str:
        """``warning`` for the lines of a Python traceback on stderr, from its header to the
        exception line (the first unindented line after it); ``info`` for everything else."""
        if source.stream != "stderr":
            return "info"
        if raw.startswith(TRACEBACK_HEADER):
            self._in_traceback.add(source)
        elif source not in self._in_traceback:
            return "info"
        elif raw[:1] not in (b" ", b"\t") and raw.strip():
            self._in_traceback.discard(source)  # the exception line ends it
        return "warning"


def _find(chunk: bytes, byte: bytes, start: int) -> int:
    """The index of ``byte`` in ``chunk`` from ``start``, or the chunk's length."""
    i = chunk.find(byte, start)
    return len(chunk) if i < 0 else i


def _emit(source: Source, raw: bytes, truncated: bool, level: str) -> dict[str, Any] | None:
    """Log one line at ``level``; return the worker's own fields when it was a JSON object."""
    log, stream = getattr(source.log, level), source.stream
    if not source.shown:
        log = functools.partial(log, **{OFF_STDOUT: True})
    text = raw.decode("utf-8", "replace")
    if text.startswith("{") and not truncated and (obj := _json_object(text)) is not None:
        log("worker_output", stream=stream, **_renamed(obj))
        return obj
    if truncated:
        log("worker_output", stream=stream, line=text, truncated=True)
    else:
        log("worker_output", stream=stream, line=text)
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    """The object ``text`` holds, if it is one that can be merged into an event."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    if text.count("{") + text.count("[") > MAX_DEPTH and _deeper_than(obj, MAX_DEPTH):
        return None
    return obj


def _deeper_than(value: Any, levels: int) -> bool:
    """Whether ``value`` nests more than ``levels`` objects and arrays; recurses at most that deep."""
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return False
    return levels == 0 or any(_deeper_than(v, levels - 1) for v in value)


def _renamed(obj: dict[str, Any]) -> dict[str, Any]:
    """The worker's fields, each reserved key prefixed ``worker_`` until it clashes with nothing."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        while key in RESERVED or key in out:
            key = "worker_" + key
        out[key] = value
    return out


def worker_field(event: dict[str, Any], key: str) -> Any:
    """A worker's own field ``key`` as its ``worker_output`` event holds it (``step`` is logged
    as ``worker_step``, since the daemon's own events use ``step``); None when absent."""
    while key in RESERVED:
        key = "worker_" + key
    return event.get(key)
