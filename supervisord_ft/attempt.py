"""One launch attempt of the worker group: its id, ranks, workers, watchdog and first failure.

Every launch is a new :class:`Attempt`, whatever caused it; its ``id`` counts launches, not
restarts, so a relaunch that spends no budget (a fallback past a bad checkpoint, a multi-node
round) still gets a fresh one. Output of an attempt that was torn down is recognised by its id and
ignored. Nothing here decides: the loop reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .causes import Cause
from .checkpoints import Checkpoint, Listing
from .ranklogs import AttemptLogs
from .rendezvous import Endpoint, News, RankInfo
from .restarts import Failure
from .watchdog import Watchdog
from .workers import Worker

# Of each rank's stderr the attempt keeps its last lines, up to this many bytes: a traceback's
# innermost frames and its exception, even of a traceback of 10,000 frames.
STDERR_TAIL_BYTES = 64 << 10
# The phases of a recovery, in order; the three before the relaunch are marked on the failed
# attempt, the last two on the one that recovers.
PHASES = ("detection", "diagnosis", "jit_wait", "teardown", "relaunch", "first_progress")


class Tail:
    """The last lines of one rank's stderr, bounded in bytes."""

    def __init__(self, limit: int = STDERR_TAIL_BYTES) -> None:
        self.limit = limit
        self.lines: deque[bytes] = deque()
        self.size = 0

    def add(self, line: bytes) -> None:
        self.lines.append(line)
        self.size += len(line)
        while self.size > self.limit and len(self.lines) > 1:
            self.size -= len(self.lines.popleft())

    def snapshot(self) -> tuple[bytes, ...]:
        """The lines as they are now: references, not a copy of the bytes."""
        return tuple(self.lines)

    def text(self, lines: tuple[bytes, ...] | None = None) -> str:
        """The tail (or a snapshot of it) as text; bytes that are not UTF-8 replaced."""
        chosen = self.lines if lines is None else lines
        return b"\n".join(line.rstrip(b"\r\n") for line in chosen).decode("utf-8", "replace")


@dataclass(frozen=True)
class Recovery:
    """Where the time went between an attempt's failure and the next one's first progress."""

    since: float  # when the failure was noticed (monotonic)
    detection: float  # seconds from the failure (an exit, the last sign of progress) to its notice
    marks: dict[str, float]  # when each of diagnosis, jit_wait and teardown ended

    def phases(self, started: float, now: float) -> dict[str, float]:
        """Seconds per phase; ``started``: every rank of the new attempt started, ``now``: it progressed.

        With hundreds of ranks the first progresses before the last is started (``started`` is
        still 0): the relaunch then ends at that progress, and the first progress took no time."""
        started = started or now
        out, t = {"detection": self.detection}, self.since
        for name in PHASES[1:4]:
            end = self.marks.get(name, t)
            out[name], t = end - t, end
        out["relaunch"], out["first_progress"] = started - t, now - started
        return {k: round(max(v, 0.0), 3) for k, v in out.items()}


@dataclass
class Attempt:
    id: int  # 0 for the first launch, +1 for each launch after it
    restart: int  # relaunches that had spent budget when this one started
    endpoint: Endpoint
    ranks: list[RankInfo]
    watchdog: Watchdog
    resume_from: Checkpoint | None
    # How it got past the failure of the attempt before it (None on the first launch).
    recovery: Recovery | None = None
    launched_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0  # every rank started
    workers: list[Worker] = field(default_factory=list)
    stepped: bool = False  # some rank reported a step or its collectives moved
    jit_armed: set[int] = field(default_factory=set)  # ranks that will save if a peer dies
    failure: Failure | None = None
    news: News | None = None  # another node's word that ended this attempt (multi-node)
    failed_at: float | None = None
    stderr: dict[int, Tail] = field(default_factory=dict)
    hung: list[int] = field(default_factory=list)  # the ranks declared hung, if that ended it
    exit_waited: set[int] = field(default_factory=set)  # silent ranks given one more limit to exit
    reported: set[int] = field(default_factory=set)  # ranks whose exit was logged
    # Ranks alive when a recovery's teardown signalled them, with their stderr's lines as they
    # were then (what a rank said after the signal, a SignalException, is not its own failure).
    torn_down: dict[int, tuple[bytes, ...]] = field(default_factory=dict)
    # Where the job stood at launch, to tell whether this attempt got further.
    launched_wall: float = field(default_factory=time.time)  # for error files' stamps
    listing: asyncio.Future[Listing] | None = None  # the checkpoint directory, listed at launch
    errors: Path | None = None  # the folder of its ranks' torchrun error files
    logs: AttemptLogs | None = None  # its ranks' files in log_dir
    high_step: int | None = None  # the highest step any rank of this attempt reported
    oom_kills: dict[int, tuple[str, int]] = field(default_factory=dict)  # rank: (cgroup, kills)
    # The recovery from this attempt's failure: seconds to notice it, when each phase ended.
    detection: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def alive(self) -> list[int]:
        return [w.rank for w in self.workers if w.alive]

    def line(self, rank: int, raw: bytes) -> None:
        """A line of ``rank``'s stderr."""
        if (tail := self.stderr.get(rank)) is None:
            tail = self.stderr[rank] = Tail()
        tail.add(raw)

    def stderr_text(self, rank: int, lines: tuple[bytes, ...] | None = None) -> str:
        return self.stderr[rank].text(lines) if rank in self.stderr else ""

    def fail(self, cause: Cause, startup_window: float, hung_before_first_step: bool = False,
             detection: float = 0.0) -> Failure:
        """Record the attempt's failure; the first one recorded stands. ``detection``: seconds
        from the failure itself to now.

        It is a start-up failure when no rank had reported a step and it came within
        ``startup_window`` seconds of the launch, or was a hang before the first step.
        """
        if self.failure is None:
            self.failed_at = time.monotonic()
            self.detection = detection
            early = self.failed_at - self.launched_at < startup_window or hung_before_first_step
            self.failure = Failure(cause.rank, cause, not self.stepped and early)
        return self.failure


def first_to_fail(workers: list[Worker]) -> Worker | None:
    """Of workers that have exited, the one that failed first by exit time (not by set order)."""
    failed = [w for w in workers if not w.alive and w.exit.result() != 0]
    return min(failed, key=lambda w: w.exited_at, default=None)
