"""Signs of progress beyond output: a rank's collectives (its channel) and its I/O (``/proc``).

A silent rank is alive while its collectives retire: its flight-recorder sequence numbers move.
A rank that neither prints nor enters a collective but reads or writes steadily (a checkpoint
saved or loaded, a dataset read) is alive too: its I/O counters grow by :data:`IO_PROGRESS_BYTES`
between two looks. A look asks one rank's channel (bounded by :data:`LOOK_TIMEOUT`) and reads
one ``/proc`` file; the watchdog looks at a rank only when it has shown nothing for a while.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from . import flight, procfs
from .channel import ChannelError, ask

LOOK_TIMEOUT = 0.5
# A hung rank's background threads may trickle (a log line, a metrics push); a save or a load
# moves megabytes.
IO_PROGRESS_BYTES = 1 << 20


@dataclass(frozen=True)
class Seen:
    """What one look at a rank found."""

    at: float | None  # monotonic time of the newest progress found; None: nothing new
    how: str | None  # "collectives" or "io"
    gaps: tuple[float, ...] = ()  # intervals between collectives entered since the last look
    channel: str | None = None  # why the channel gave nothing (None: it answered)
    # The I/O counter last read predates the rank's last progress, so its growth says nothing of
    # the silence (an import's megabytes before the first step): read again, judge next look.
    unsure: bool = False


@dataclass
class _Last:
    looked: float
    counter: int | None = None
    newest_ns: int | None = None
    io: int | None = None


class Looker:
    """Looks at one attempt's ranks; remembers what each showed last."""

    def __init__(self, sockets: Mapping[int, str], pids: Mapping[int, int],
                 progress: Mapping[int, float], clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        """``progress``: each rank's last sign of progress seen otherwise (on ``clock``)."""
        self.sockets = sockets
        self.pids = pids
        self.progress = progress
        self.clock = clock
        self.wall = wall
        now = clock()
        self._last = {r: _Last(now, io=procfs.io_chars(pid)) for r, pid in pids.items()}

    async def look(self, ranks: Iterable[int]) -> dict[int, Seen]:
        ranks = [r for r in ranks if r in self._last]
        seen = await asyncio.gather(*(self._look(r) for r in ranks))
        return dict(zip(ranks, seen))

    async def _look(self, rank: int) -> Seen:
        last = self._last[rank]
        now = self.clock()
        io = procfs.io_chars(self.pids[rank])
        unsure = self.progress.get(rank, float("-inf")) > last.looked
        grew = not unsure and io is not None and last.io is not None and io - last.io >= IO_PROGRESS_BYTES
        last.io = io if io is not None else last.io
        trace, why = None, None
        path = self.sockets.get(rank)
        if path is None:
            why = "no channel"
        else:
            try:
                trace = flight.parse_trace((await ask(path, "fr_trace_json", LOOK_TIMEOUT)).body)
            except ChannelError as exc:
                why = str(exc)
            except ValueError as exc:
                why = f"not a flight-recorder trace ({exc})"[:200]
        previous_look, last.looked = last.looked, now
        seen = Seen(now if grew else None, "io" if grew else None, channel=why, unsure=unsure)
        if trace is None:
            return seen
        moved = last.counter is not None and trace.counter != last.counter
        newer = trace.newest_ns is not None and (last.newest_ns is None or trace.newest_ns > last.newest_ns)
        gaps = tuple(g for g, end in trace.gaps if last.newest_ns is None or end > last.newest_ns)
        last.counter, last.newest_ns = trace.counter, trace.newest_ns or last.newest_ns
        if not (moved or newer):
            return Seen(seen.at, seen.how, gaps, unsure=unsure)
        # When the newest collective was entered, on this clock; a retirement since the last
        # look with no newer entry happened after that look at the earliest.
        at = now - max(0.0, self.wall() - trace.newest_ns / 1e9) if newer and trace.newest_ns else previous_look
        if moved:
            at = max(at, previous_look)
        return Seen(max(at, seen.at or at), "collectives", gaps, unsure=unsure)

