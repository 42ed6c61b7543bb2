"""One launch attempt of the worker group: its id, ranks, workers, watchdog and first failure.

Every launch is a new :class:`Attempt`, whatever caused it; its ``id`` counts launches, not
restarts, so a relaunch that spends no budget (a fallback past a bad checkpoint, a multi-node
round) still gets a fresh one. Output of an attempt that was torn down is recognised by its id and
ignored. Nothing here decides: the loop reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .checkpoints import Checkpoint
from .rendezvous import Endpoint, News, RankInfo
from .restarts import Failure
from .watchdog import Watchdog
from .workers import Worker

# A failure's reason carries at most this much of the rank's last stderr line: enough for a
# Python exception message, short enough to keep a `state_changed` event one screen line.
MAX_ERROR_CHARS = 500


@dataclass
class Attempt:
    id: int  # 0 for the first launch, +1 for each launch after it
    restart: int  # relaunches that had spent budget when this one started
    endpoint: Endpoint
    ranks: list[RankInfo]
    watchdog: Watchdog
    resume_from: Checkpoint | None
    # When the failure that this attempt recovers from was detected (None on the first launch).
    recovering_since: float | None = None
    launched_at: float = field(default_factory=time.monotonic)
    workers: list[Worker] = field(default_factory=list)
    stepped: bool = False  # some rank reported a step or its collectives moved
    jit_armed: set[int] = field(default_factory=set)  # ranks that will save if a peer dies
    failure: Failure | None = None
    news: News | None = None  # another node's word that ended this attempt (multi-node)
    failed_at: float | None = None
    last_stderr: dict[int, bytes] = field(default_factory=dict)
    hung: list[int] = field(default_factory=list)  # the ranks declared hung, if that ended it

    def alive(self) -> list[int]:
        return [w.rank for w in self.workers if w.alive]

    def last_error(self, rank: int) -> str:
        return self.last_stderr.get(rank, b"").decode("utf-8", "replace").strip()[:MAX_ERROR_CHARS]

    def fail(self, rank: int, returncode: int | None, last_error: str, startup_window: float,
             hung_before_first_step: bool = False) -> Failure:
        """Record the attempt's failure; the first one recorded stands.

        It is a start-up failure when no rank had reported a step and it came within
        ``startup_window`` seconds of the launch, or was a hang before the first step.
        """
        if self.failure is None:
            self.failed_at = time.monotonic()
            early = self.failed_at - self.launched_at < startup_window or hung_before_first_step
            self.failure = Failure(rank, returncode, last_error, not self.stepped and early)
        return self.failure


def first_to_fail(workers: list[Worker]) -> Worker | None:
    """Of workers that have exited, the one that failed first by exit time (not by set order)."""
    failed = [w for w in workers if not w.alive and w.exit.result() != 0]
    return min(failed, key=lambda w: w.exited_at, default=None)
