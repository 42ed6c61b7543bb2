"""Worker output → log events, without ever letting a worker block on a full pipe.

One reader task per pipe reads chunks as fast as the kernel delivers them and splits them into
lines (cheap C-level work); one emitter task turns lines into ``worker_output`` events. The two
are joined by a backlog bounded in bytes: when the emitter falls behind a flood, new lines are
dropped and counted, and a ``worker_output_dropped`` event reports how many. A line longer than
``max_line_bytes`` is cut there and marked ``truncated``; the rest of it is discarded without
being buffered. Bytes that are not UTF-8 are replaced, never fatal.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHUNK = 1 << 16
MAX_BACKLOG_BYTES = 16 << 20
# What a queued line costs beyond its bytes (bytes object, tuple, deque slot): counted against
# MAX_BACKLOG_BYTES, or a flood of short lines would hold several times the budget.
LINE_OVERHEAD = 160
EMIT_BATCH = 256  # lines emitted before yielding to the readers
# Keys of a worker's JSON line that would overwrite the daemon's own fields get a worker_ prefix.
RESERVED = frozenset({"event", "timestamp", "level", "run_id", "rank", "stream", "restart",
                      "attempt", "line", "truncated"})


@dataclass(frozen=True, eq=True)
class Source:
    """One pipe of one worker of one launch attempt."""

    rank: int
    attempt: int
    stream: str  # "stdout" or "stderr"
    log: Any = field(compare=False, hash=False)  # bound with rank, restart and attempt


class OutputRouter:
    """Owns the backlog and the emitter.

    ``on_line(source, raw)`` runs in the reader for every line, dropped or not (liveness);
    ``on_json(source, fields)`` runs in the emitter for every line that is a JSON object.
    """

    def __init__(self, max_line_bytes: int, on_line: Callable[[Source, bytes], None] | None = None,
                 on_json: Callable[[Source, dict[str, Any]], None] | None = None,
                 max_backlog_bytes: int = MAX_BACKLOG_BYTES) -> None:
        self.max_line = max_line_bytes
        self.max_backlog = max_backlog_bytes
        self.on_line = on_line
        self.on_json = on_json
        self._backlog: deque[tuple[Source, bytes, bool]] = deque()
        self._backlog_bytes = 0
        self._dropped: dict[Source, int] = {}
        self._ready = asyncio.Event()
        self.lines = 0

    def reader(self, source: Source, pipe: asyncio.StreamReader) -> asyncio.Task[None]:
        return asyncio.create_task(self._read(source, pipe), name=f"read-{source.rank}-{source.stream}")

    async def _read(self, source: Source, pipe: asyncio.StreamReader) -> None:
        partial = bytearray()
        discarding = False  # inside an over-long line, until its newline
        limit = self.max_line
        while chunk := await pipe.read(CHUNK):
            start = 0
            while (nl := chunk.find(b"\n", start)) >= 0:
                if discarding:
                    discarding = False
                elif partial:
                    partial += chunk[start:nl]
                    self._push(source, bytes(partial[:limit]), len(partial) > limit)
                    partial.clear()
                else:
                    self._push(source, chunk[start:min(nl, start + limit)], nl - start > limit)
                start = nl + 1
            if not discarding and start < len(chunk):
                partial += chunk[start:]
                if len(partial) > limit:
                    self._push(source, bytes(partial[:limit]), True)
                    partial.clear()
                    discarding = True
        if partial:
            self._push(source, bytes(partial), False)

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
            await self._ready.wait()
            self._ready.clear()
            while self._backlog:
                self.flush(EMIT_BATCH)
                await asyncio.sleep(0)

    def flush(self, limit: int | None = None) -> None:
        """Emit up to ``limit`` pending lines now (all when None), then report drops."""
        n = 0
        while self._backlog and (limit is None or n < limit):
            source, raw, truncated = self._backlog.popleft()
            self._backlog_bytes -= len(raw) + LINE_OVERHEAD
            fields = _emit(source, raw, truncated)
            if fields is not None and self.on_json is not None:
                self.on_json(source, fields)
            n += 1
        self.lines += n
        if self._dropped and not self._backlog:
            for source, count in self._dropped.items():
                source.log.warning("worker_output_dropped", stream=source.stream, lines=count,
                                   reason="output faster than the daemon can log it")
            self._dropped.clear()


def _emit(source: Source, raw: bytes, truncated: bool) -> dict[str, Any] | None:
    """Log one line; return the worker's own fields when the line was a JSON object."""
    log, stream = source.log, source.stream
    text = raw.decode("utf-8", "replace")
    if text.endswith("\r"):
        text = text[:-1]
    if text.startswith("{") and not truncated:
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            log.info("worker_output", stream=stream,
                     **{("worker_" + k if k in RESERVED else k): v for k, v in obj.items()})
            return obj
    if truncated:
        log.info("worker_output", stream=stream, line=text, truncated=True)
    else:
        log.info("worker_output", stream=stream, line=text)
    return None
