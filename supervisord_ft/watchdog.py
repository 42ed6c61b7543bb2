"""Hang detection: a per-rank progress clock for one launch attempt.

A rank makes progress whenever it prints anything, a whole line or not (a progress bar redrawn
with ``\\r``). Until it reports its first step (a JSON line with ``"event": "step"``, see
``worker/contract.py``) it is also allowed ``startup_timeout`` from the launch, which covers
imports, rendezvous and checkpoint loading. The watchdog sleeps until the earliest deadline and
re-checks; output only moves deadlines later, and the one change that moves a deadline earlier
(a rank's first step ends its startup allowance) wakes it.
So it costs a clock read per chunk read and wakes once per deadline, not on a polling tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Hang:
    rank: int
    silent_for: float  # seconds since the rank's last line (or since launch)
    before_first_step: bool


class Watchdog:
    def __init__(self, ranks: Iterable[int], hang_timeout: float, startup_timeout: float,
                 clock: Callable[[], float]) -> None:
        self.hang_timeout = hang_timeout
        self.startup_timeout = startup_timeout
        self.clock = clock
        self.launched = clock()
        self.last = {r: self.launched for r in ranks}
        self.stepped: set[int] = set()
        self._first_step = asyncio.Event()

    def output(self, rank: int) -> None:
        self.last[rank] = self.clock()

    def step(self, rank: int) -> None:
        if rank not in self.stepped:
            self.stepped.add(rank)
            self._first_step.set()

    def _deadline(self, rank: int) -> float:
        deadline = self.last[rank] + self.hang_timeout
        if rank not in self.stepped:
            deadline = max(deadline, self.launched + self.startup_timeout)
        return deadline

    async def expired(self, alive: Callable[[], Iterable[int]]) -> list[Hang]:
        """Return the ranks past their deadline, once there are any (never, if disabled)."""
        while True:
            now = self.clock()
            deadlines = {r: self._deadline(r) for r in alive()} if self.hang_timeout > 0 else {}
            if not deadlines:  # disabled, or nobody left to watch: cancelled with the attempt
                await asyncio.get_running_loop().create_future()
            hung = [Hang(r, now - self.last[r], r not in self.stepped)
                    for r, d in deadlines.items() if d <= now]
            if hung:
                return hung
            self._first_step.clear()
            try:
                async with asyncio.timeout(min(deadlines.values()) - now):
                    await self._first_step.wait()
            except TimeoutError:
                pass
