"""Hang detection: per-rank progress clocks for one launch attempt, and the job's cadence.

A rank makes progress when it prints anything (a whole line or not: a progress bar redrawn with
``\\r``), reports a step, enters or retires a collective (its flight recorder, read through its
channel), or reads or writes steadily (:mod:`progress`). Output and steps reach the clock as they
happen; the rest is looked for when a rank has shown nothing for :data:`LOOK_EVERY` seconds, and
once more, fresh, before a hang is declared (twice, :data:`CONFIRM_LOOK` apart, when the first
could not judge the rank's I/O: its last reading predates the rank's last progress). Until a rank's first sign of progress it is
allowed ``startup_timeout`` from the launch (imports, rendezvous, a checkpoint load). The group
hangs when every live rank is past its deadline: while one progresses (saves, prints), the
others may wait for it in a collective.

How long is too long comes from the job (:class:`Cadence`): once it has seen
:data:`MIN_SAMPLES` step or collective intervals (warm-up excluded), a hang is
:data:`HANG_MULTIPLE` times the longest of them, never less than ``hang_floor``, never more
than ``hang_timeout`` (the user's cap, and the rule until the cadence is known).

The watchdog sleeps until the earliest deadline or look, and re-checks; output only moves
deadlines later, and the one change that moves one earlier (a rank's first progress ends its
start-up allowance) wakes it. So it costs a clock read per chunk read and wakes once per
deadline, not on a polling tick.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .progress import Seen

HANG_MULTIPLE = 40.0  # twice the margin a slow phase of 20x the usual step needs
MIN_SAMPLES = 10  # intervals seen before the cadence is trusted
WARMUP_STEPS = 5  # a rank's first step intervals of an attempt: compilation, caches, not rhythm
LOOK_EVERY = 30.0  # a rank silent this long is looked at (its collectives, its I/O)
# A look that could not judge a rank's I/O (its counter was read before the rank's last
# progress) is followed by another this much later, before the rank can be declared hung.
CONFIRM_LOOK = 1.0


@dataclass(frozen=True)
class Hang:
    rank: int
    silent_for: float  # seconds since the rank's last sign of progress (or since launch)
    before_first_step: bool  # no sign of progress at all in this attempt


@dataclass
class Cadence:
    """The job's rhythm, kept across attempts and, in the run dir, across runs."""

    longest: float = 0.0  # the longest step or collective interval seen (seconds)
    samples: int = 0

    def observe(self, interval: float) -> None:
        if interval > 0:
            self.longest = max(self.longest, interval)
            self.samples += 1

    @property
    def known(self) -> bool:
        return self.samples >= MIN_SAMPLES

    def timeout(self, cap: float, floor: float) -> float:
        if not self.known or cap <= 0:
            return cap
        return min(cap, max(floor, HANG_MULTIPLE * self.longest))

    @classmethod
    def load(cls, path: Path) -> Cadence:
        """The cadence a previous run left, or a blank one (a missing or garbled file)."""
        try:
            doc = json.loads(path.read_text())
            return cls(float(doc["longest"]), int(doc["samples"]))
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def save(self, path: Path) -> None:
        """Written by a thread of its own, atomically; a failure loses only this hint."""
        text = json.dumps({"longest": self.longest, "samples": self.samples})

        def write() -> None:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            except OSError:
                pass
        threading.Thread(target=write, name="cadence-writer", daemon=True).start()


Look = Callable[[Iterable[int]], Awaitable[Mapping[int, Seen]]]


class Watchdog:
    def __init__(self, ranks: Iterable[int], hang_timeout: float, startup_timeout: float,
                 clock: Callable[[], float], cadence: Cadence | None = None,
                 hang_floor: float = 0.0, look: Look | None = None) -> None:
        self.hang_timeout = hang_timeout
        self.hang_floor = hang_floor
        self.startup_timeout = startup_timeout
        self.clock = clock
        self.cadence = cadence or Cadence()
        self.look = look
        self.launched = clock()
        self.last = {r: self.launched for r in ranks}
        self.looked = dict(self.last)
        self.started: set[int] = set()  # ranks that showed any sign of progress
        self.stepped: dict[int, tuple[int, float]] = {}  # rank: (steps seen, when the last was)
        self.moved: set[int] = set()  # ranks whose collectives were seen to move
        self.hold: dict[int, float] = {}  # rank: no hang before this (a confirming look is due)
        self._woken = asyncio.Event()
        # Called once per rank, when its collectives are first seen to move (a step is the
        # caller's own news: it parsed the line).
        self.on_collectives: Callable[[int], None] = lambda rank: None
        # Called after new intervals were learnt (the limit in force may have changed).
        self.on_cadence: Callable[[], None] = lambda: None
        # Called when a look got nothing from a rank's channel, with why.
        self.on_no_channel: Callable[[int, str], None] = lambda rank, why: None

    @property
    def timeout(self) -> float:
        return self.cadence.timeout(self.hang_timeout, self.hang_floor)

    def output(self, rank: int) -> None:
        """On the output pump's path: a clock read, and a set lookup."""
        self.last[rank] = self.clock()
        if rank not in self.started:
            self._started(rank)

    def peer_exited(self) -> None:
        """A rank finished (exit 0): every other rank's clock starts again now. A silent rank
        whose progress was last seen a look ago is finishing too, not hung the moment it is alone."""
        now = self.clock()
        for rank in self.last:
            self.last[rank] = max(self.last[rank], now)
        self._woken.set()

    def step(self, rank: int) -> None:
        now = self.clock()
        count, previous = self.stepped.get(rank, (0, now))
        if count > WARMUP_STEPS:
            self.cadence.observe(now - previous)
            self.on_cadence()
        self.stepped[rank] = (count + 1, now)
        self.last[rank] = now
        self._started(rank)

    def _started(self, rank: int) -> None:
        if rank not in self.started:
            self.started.add(rank)
            self._woken.set()

    def _seen(self, rank: int, seen: Seen) -> None:
        self.looked[rank] = self.clock()
        if seen.unsure:
            self.hold[rank] = self.looked[rank] + CONFIRM_LOOK
        for gap in seen.gaps:
            self.cadence.observe(gap)
        if seen.gaps:
            self.on_cadence()
        if seen.channel is not None and self.looked[rank] - self.launched >= LOOK_EVERY:
            self.on_no_channel(rank, seen.channel)  # not while it may still be importing torch
        if seen.at is not None and seen.how is not None:
            self.last[rank] = max(self.last[rank], seen.at)
            if seen.how == "collectives":  # not I/O: an interpreter reads megabytes of modules as it starts
                if rank not in self.moved:
                    self.moved.add(rank)
                    self.on_collectives(rank)
                self._started(rank)

    def _deadline(self, rank: int) -> float:
        deadline = max(self.last[rank] + self.timeout, self.hold.get(rank, 0.0))
        if rank not in self.started:
            deadline = max(deadline, self.launched + self.startup_timeout)
        return deadline

    def _next_look(self, rank: int) -> float:
        """Soon after the launch (1, 2, 4 ... s: the cadence is learnt early), then every LOOK_EVERY."""
        if self.look is None:
            return float("inf")
        since = max(self.last[rank], self.looked[rank])
        return since + min(LOOK_EVERY, max(1.0, self.looked[rank] - self.launched))

    async def _look(self, ranks: list[int]) -> None:
        if self.look is not None and ranks:
            for rank, seen in (await self.look(ranks)).items():
                self._seen(rank, seen)

    async def expired(self, alive: Callable[[], Iterable[int]]) -> list[Hang]:
        """Return the hung ranks once every live rank is past its deadline (never, if disabled).

        The group is alive while any of its ranks progresses: ranks that wait in a collective
        for a peer that saves a checkpoint, or for one that prints, are not hung. The longest
        silent comes first: the rank that stopped before the others waited for it.
        """
        while True:
            ranks = list(alive()) if self.hang_timeout > 0 else []
            if not ranks:  # disabled, or nobody left to watch: cancelled with the attempt
                await asyncio.get_running_loop().create_future()
            if all(self._deadline(r) <= self.clock() for r in ranks):
                await self._look(ranks)  # a fresh look first: silent ranks whose collectives move
                now = self.clock()
                if all(self._deadline(r) <= now for r in ranks):
                    return sorted((Hang(r, now - self.last[r], r not in self.started) for r in ranks),
                                  key=lambda h: -h.silent_for)
                continue
            now = self.clock()
            await self._look([r for r in ranks if self._next_look(r) <= now])
            wake = min(max(self._deadline(r) for r in ranks), min(map(self._next_look, ranks)))
            self._woken.clear()
            try:
                async with asyncio.timeout(max(0.0, wake - self.clock())):
                    await self._woken.wait()
            except TimeoutError:
                pass
