"""Restart accounting in one place: the budget, its sliding window, backoff and crash loops.

``max_restarts`` relaunches are allowed within any ``restart_window`` seconds (0: within the
whole run), so a job that ran cleanly for a long time gets its budget back. Relaunches back off
exponentially: the first is immediate, then ``backoff``, 2×, 4×, … up to ``backoff_max``.

Every rule reads the failure's explained cause (:mod:`causes`), never a stderr line:

* A crash loop is a start-up failure that repeats, as supervisord's ``startsecs`` defines it: two
  consecutive attempts that both fail the same way (the same cause, exception and place) at
  start-up (see :attr:`Failure.at_startup`), such as an ImportError or a bad argument.
* A deterministic failure is the job's own failure (not a signal from outside, OOM, a hang or a
  lost peer) that repeats the same way in the next attempt, which got no further than the one
  before it: the same exception at the same place at the same point of progress.
* No restart without progress: ``max_stalled_attempts`` attempts in a row of the job's own
  failures that got no further than where they resumed end the run, whatever the window says.
  An attempt whose progress the daemon cannot see counts as progress. 0 turns off this rule and
  the one before it (torchrun's behaviour: the budget alone decides).

No restart can fix these, so the run ends at once, and a requeue would repeat them: the
:class:`Decision` says ``requeue=False``. Exit codes in ``no_retry_exit_codes`` do the same. Any
other failure (a rank killed from outside, a crash after progress) spends one restart and no more.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .causes import Cause


@dataclass(frozen=True)
class Failure:
    rank: int  # the first rank seen to fail (the root may be another: ``cause.rank``)
    cause: Cause  # the first failure's own until the attempt is explained, then the root's
    # A start-up failure: the attempt made no progress (no step, no newer checkpoint) and failed
    # within the start-up window of its launch, or hung before its first step.
    at_startup: bool
    # The attempt got further than every attempt before it (a higher step, a checkpoint written);
    # None where the daemon cannot see the job's progress.
    progressed: bool | None = None

    @property
    def returncode(self) -> int | None:
        return self.cause.returncode


@dataclass(frozen=True)
class Decision:
    relaunch: bool
    delay: float
    reason: str
    crash_loop: bool = False
    requeue: bool = True  # False: a rerun of the job would fail the same way


class RestartPolicy:
    def __init__(self, max_restarts: int, window: float, backoff: float, backoff_max: float,
                 no_retry_exit_codes: tuple[int, ...], max_stalled_attempts: int = 3) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.no_retry = frozenset(no_retry_exit_codes)
        self.max_stalled = max_stalled_attempts
        self.stalled = 0  # the job's own failures in a row without progress
        self.total = 0
        self._times: deque[float] = deque()
        self._previous: Failure | None = None

    def decide(self, failure: Failure, now: float) -> Decision:
        """Judge ``failure``; the budget is spent only by :meth:`spend`, when a relaunch happens."""
        previous, self._previous = self._previous, failure
        c = failure.cause
        if failure.progressed is not False:
            self.stalled = 0
        elif not c.outside:
            self.stalled += 1
        if c.returncode in self.no_retry:
            return Decision(False, 0.0, f"rank {c.rank} exited with {c.returncode}, listed in "
                                        f"no_retry_exit_codes: {c.summary()}", requeue=False)
        same = previous is not None and previous.cause.signature == c.signature
        if same and previous.at_startup and failure.at_startup:
            return Decision(False, 0.0, "crash loop: two attempts in a row failed the same way "
                                        f"at start-up: {c.summary()}", crash_loop=True, requeue=False)
        if same and not c.outside and failure.progressed is False and self.max_stalled > 0:
            return Decision(False, 0.0, f"deterministic failure: rank {c.rank} failed the same way "
                                        f"twice in a row at the same point of progress: {c.summary()}",
                            requeue=False)
        if 0 < self.max_stalled <= self.stalled:
            return Decision(False, 0.0, f"no progress: {self.stalled} attempts in a row got no "
                                        f"further than where they resumed; the last: {c.summary()}",
                            requeue=False)
        if self.window > 0:
            while self._times and self._times[0] <= now - self.window:
                self._times.popleft()
        recent = len(self._times)
        if recent >= self.max_restarts:
            scope = f"within {self.window:g} s" if self.window > 0 else "in this run"
            return Decision(False, 0.0, f"max_restarts ({self.max_restarts}) {scope} exhausted")
        # The exponent is capped: 2 ** 64 times any backoff is past any cap, and 2 ** 1100 is no float.
        delay = 0.0 if recent == 0 else min(self.backoff_max, self.backoff * 2 ** min(recent - 1, 64))
        return Decision(True, delay, f"restart {self.total + 1} ({recent + 1} of {self.max_restarts}"
                                     f"{f' within {self.window:g} s' if self.window > 0 else ''}): "
                                     f"rank {c.rank} {c.summary()}")

    def spend(self, now: float) -> None:
        """Count one relaunch that is happening now."""
        self._times.append(now)
        self.total += 1
