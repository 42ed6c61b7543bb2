"""Restart accounting in one place: the budget, its sliding window, backoff and crash loops.

``max_restarts`` relaunches are allowed within any ``restart_window`` seconds (0: within the
whole run), so a job that ran cleanly for a long time gets its budget back. Relaunches back off
exponentially: the first is immediate, then ``backoff``, 2×, 4×, … up to ``backoff_max``.

A crash loop is a start-up failure that repeats, as supervisord's ``startsecs`` defines it: two
consecutive attempts that both fail the same way (same exit code and last stderr line) at start-up
(see :attr:`Failure.at_startup`), such as an ImportError or a bad argument. No restart can fix
it, so the run fails at once instead of spending the budget. Any other failure (a rank killed
from outside after it ran past the start-up window, a crash after progress) spends one restart
and no more. Exit codes in ``no_retry_exit_codes`` fail the run at once too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    rank: int
    returncode: int | None  # None for a hang or a failed spawn
    last_error: str  # the failing rank's last stderr line, or what went wrong
    # A start-up failure: the attempt made no progress (no step, no newer checkpoint) and failed
    # within the start-up window of its launch, or hung before its first step.
    at_startup: bool

    @property
    def signature(self) -> tuple[int | None, str]:
        return self.returncode, self.last_error


@dataclass(frozen=True)
class Decision:
    relaunch: bool
    delay: float
    reason: str
    crash_loop: bool = False


class RestartPolicy:
    def __init__(self, max_restarts: int, window: float, backoff: float, backoff_max: float,
                 no_retry_exit_codes: tuple[int, ...]) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.no_retry = frozenset(no_retry_exit_codes)
        self.total = 0
        self._times: deque[float] = deque()
        self._previous: Failure | None = None

    def decide(self, failure: Failure, now: float) -> Decision:
        """Judge ``failure``; the budget is spent only by :meth:`spend`, when a relaunch happens."""
        previous, self._previous = self._previous, failure
        if failure.returncode in self.no_retry:
            return Decision(False, 0.0, f"rank {failure.rank} exited with {failure.returncode}, "
                                        "listed in no_retry_exit_codes")
        if (previous is not None and previous.at_startup and failure.at_startup
                and previous.signature == failure.signature):
            return Decision(False, 0.0, "crash loop: two attempts in a row failed the same way "
                                        f"at start-up: {failure.last_error!r}", crash_loop=True)
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
                                     f"{f' within {self.window:g} s' if self.window > 0 else ''})")

    def spend(self, now: float) -> None:
        """Count one relaunch that is happening now."""
        self._times.append(now)
        self.total += 1
