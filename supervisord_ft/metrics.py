"""Prometheus metrics and readiness: a view fed only by the events the JSON log gets.

:class:`Metrics` subscribes to the :class:`~supervisord_ft.logs.EventBus`; it keeps no state of
its own beyond what those events say, so ``events.jsonl`` and a scrape always agree. Values
that age (seconds since a rank's last output or the newest checkpoint, steps per second,
restarts still inside the window) are computed when scraped, from the receive times of the
events; the daemon's own memory, fds and CPU come from ``prometheus_client``'s process
collector, which reads ``/proc/self`` at scrape time.

Crash detection latency is not exported: the moment a process dies is known only to the
kernel and the worker, and the daemon's first sign of it is the ``worker_exited`` event
itself. A hang's detection latency is exactly the silence before it was declared
(``hang_detected.silent_for``), so that is exported as a histogram, one sample per rank declared
hung; the hangs themselves are counted once per attempt they ended (every live rank is declared
hung at once, so each hang logs one ``hang_detected`` per rank).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from .fsm import State
from .output import worker_field
from .supervisor import STEP_EVENT

PREFIX = "supervisord_ft_"
RATE_WINDOW = 30.0  # steps per second are measured over this many recent seconds
# A scrape renders every series on the loop (about 2 ms for 2 ranks, 20 ms for 256 on a loaded
# core): scrapes closer together than this get the previous body, so that a client scraping in
# a loop cannot take the loop from the supervisor.
MIN_SCRAPE_INTERVAL = 1.0
RECOVERY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
HANG_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
CHECKPOINT_SAVED_EVENT = "checkpoint_saved"  # the built-in worker's report of a save


class Metrics:
    """The registry and the handlers that update it from events.

    ``clock`` is monotonic seconds; ages use the time an event was received, which is the
    time it was logged (views are called synchronously as each event is written). Values
    updated for every output line (line counts, last steps) are plain numbers rendered at
    scrape time, not ``prometheus_client`` metrics: a labelled metric's update costs
    microseconds, paid for each worker line.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        disable_created_metrics()  # no `_created` twin of every counter: noise for a scraper
        self.registry = CollectorRegistry()
        r = self.registry
        self.state_gauge = Gauge(PREFIX + "state", "1 for the group's current state, 0 for the others",
                                 ["state"], registry=r)
        self.attempt_gauge = Gauge(PREFIX + "attempt", "current launch attempt (0 for the first)",
                                   registry=r)
        self.restarts = Counter(PREFIX + "restarts", "relaunches that spent restart budget",
                                registry=r)
        self.rank_up = Gauge(PREFIX + "rank_up", "1 while the rank's process runs", ["rank"],
                             registry=r)
        self.recovery = Histogram(PREFIX + "recovery_seconds", "failure detected -> first step "
                                  "of the relaunched group", buckets=RECOVERY_BUCKETS, registry=r)
        self.hang_detection = Histogram(PREFIX + "hang_detection_seconds", "silence of a rank "
                                        "before it was declared hung", buckets=HANG_BUCKETS,
                                        registry=r)
        self.hangs = Counter(PREFIX + "hangs", "attempts ended by a hang", registry=r)
        self.failures = Counter(PREFIX + "failures", "failed attempts by their explained root "
                                "cause (failure_explained.cause)", ["cause"], registry=r)
        self.phases = Counter(PREFIX + "recovery_phase_seconds", "seconds recoveries spent in "
                              "each phase (recovered.phases)", ["phase"], registry=r)
        self.hang_timeout = Gauge(PREFIX + "hang_timeout_seconds", "the hang limit in force: "
                                  "hang_timeout until the job's cadence is learnt (0: off)",
                                  registry=r)
        self.dropped_lines = Counter(PREFIX + "output_lines_dropped", "worker output lines "
                                     "dropped because the log fell behind", registry=r)
        ProcessCollector(namespace="", registry=r)  # process_resident_memory_bytes, _open_fds, ...
        r.register(self)  # the values computed at scrape time: see collect()

        self.state = State.LAUNCHING
        self.attempt: int | None = None
        self.num_workers = 0
        self.restart_window = 0.0
        self._restart = 0
        self._restart_times: deque[float] = deque()
        self._stepped: set[int] = set()  # ranks that reported a step in the current attempt
        self._last_output: dict[int, float] = {}
        self._last_step: dict[int, int] = {}
        self._lines: dict[str, int] = {}
        self._body = b""
        self._body_at = -MIN_SCRAPE_INTERVAL
        self._steps: deque[tuple[float, int]] = deque()  # (time, new highest step) this attempt
        self._checkpoint: tuple[int, float] | None = None  # (step, written at on our clock)
        self._hung_attempt: int | None = None  # the attempt whose hang was counted
        self._set_state(State.LAUNCHING)
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "supervisor_start": self._on_start,
            "state_changed": self._on_state_changed,
            "launching": self._on_launching,
            "worker_started": self._on_worker_started,
            "worker_exited": self._on_worker_exited,
            "worker_output": self._on_output,
            "worker_output_dropped": self._on_dropped,
            "recovered": self._on_recovered,
            "failure_explained": lambda e: self.failures.labels(str(e.get("cause"))).inc(),
            "hang_detected": self._on_hang_detected,
            "hang_timeout_learnt": lambda e: self._set_hang_timeout(e.get("timeout")),
            "checkpoint_selected": self._on_checkpoint_selected,
        }

    # -- the view -------------------------------------------------------------------------------
    def observe(self, event: dict[str, Any]) -> None:
        """The :class:`EventBus` subscriber."""
        handler = self._handlers.get(event["event"])
        if handler is not None:
            handler(event)

    def unready_reason(self) -> str | None:
        """None when ready: RUNNING, and every rank of the current attempt reported a step."""
        if self.state is not State.RUNNING:
            return f"state is {self.state.value}"
        if len(self._stepped) < self.num_workers:
            return f"{len(self._stepped)} of {self.num_workers} ranks have stepped"
        return None

    def exposition(self) -> bytes:
        now = self.clock()
        if now - self._body_at >= MIN_SCRAPE_INTERVAL:
            self._body, self._body_at = generate_latest(self.registry), now
        return self._body

    # -- handlers -------------------------------------------------------------------------------
    def _set_state(self, state: State) -> None:
        self.state = state
        for s in State:
            self.state_gauge.labels(s.value).set(1 if s is state else 0)

    def _on_start(self, e: dict[str, Any]) -> None:
        self.restart_window = float(e["config"].get("restart_window", 0.0))
        self._set_hang_timeout(e["config"].get("hang_timeout"))

    def _on_state_changed(self, e: dict[str, Any]) -> None:
        self._set_state(State(e["to"]))
        if e["restart"] > self._restart:
            self.restarts.inc(e["restart"] - self._restart)
            self._restart = e["restart"]
            self._restart_times.append(self.clock())

    def _on_launching(self, e: dict[str, Any]) -> None:
        self.attempt = e["attempt"]
        self.attempt_gauge.set(e["attempt"])
        self.num_workers = e["num_workers"]
        self._stepped.clear()
        self._steps.clear()
        self._last_output.clear()
        self._last_step.clear()

    def _on_worker_started(self, e: dict[str, Any]) -> None:
        self.rank_up.labels(str(e["rank"])).set(1)
        self._last_step[e["rank"]] = 0
        self._last_output[e["rank"]] = self.clock()

    def _on_worker_exited(self, e: dict[str, Any]) -> None:
        self.rank_up.labels(str(e["rank"])).set(0)

    def _on_output(self, e: dict[str, Any]) -> None:
        self._lines[e["stream"]] = self._lines.get(e["stream"], 0) + 1
        if e.get("attempt") != self.attempt:
            return
        now = self.clock()
        rank = e["rank"]
        self._last_output[rank] = now
        kind = e.get("worker_event")
        step = worker_field(e, "step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        if kind == STEP_EVENT:
            self._stepped.add(rank)
            self._last_step[rank] = step
            if not self._steps or step > self._steps[-1][1]:
                self._steps.append((now, step))
                self._forget_old_steps(now)
        elif kind == CHECKPOINT_SAVED_EVENT:
            self._note_checkpoint(step, now)

    def _on_recovered(self, e: dict[str, Any]) -> None:
        self.recovery.observe(e["seconds"])
        phases = e.get("phases")
        for phase, seconds in (phases.items() if isinstance(phases, dict) else ()):
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
                self.phases.labels(str(phase)).inc(seconds)

    def _on_hang_detected(self, e: dict[str, Any]) -> None:
        self.hang_detection.observe(e["silent_for"])
        self._set_hang_timeout(e.get("timeout"))
        if e.get("attempt") != self._hung_attempt:  # the first of the hang's per-rank events
            self._hung_attempt = e.get("attempt")
            self.hangs.inc()

    def _set_hang_timeout(self, seconds: Any) -> None:
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            self.hang_timeout.set(seconds)

    def _on_dropped(self, e: dict[str, Any]) -> None:
        self.dropped_lines.inc(e["lines"])
        if e.get("attempt") == self.attempt:
            self._last_output[e["rank"]] = self.clock()  # dropped lines are progress too

    def _on_checkpoint_selected(self, e: dict[str, Any]) -> None:
        if e.get("step") is None:
            return
        mtime = e.get("mtime")
        age = max(0.0, time.time() - mtime) if isinstance(mtime, (int, float)) else 0.0
        self._note_checkpoint(e["step"], self.clock() - age)

    def _note_checkpoint(self, step: int, at: float) -> None:
        if self._checkpoint is None or step >= self._checkpoint[0]:
            self._checkpoint = (step, at)

    # -- computed at scrape time ----------------------------------------------------------------
    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = self.clock()
        lines = CounterMetricFamily(PREFIX + "output_lines", "worker output lines logged",
                                    labels=["stream"])
        for stream, n in sorted(self._lines.items()):
            lines.add_metric([stream], n)
        yield lines
        steps = GaugeMetricFamily(PREFIX + "rank_last_step", "last step the rank reported",
                                  labels=["rank"])
        for rank, n in sorted(self._last_step.items()):
            steps.add_metric([str(rank)], n)
        yield steps
        ages = GaugeMetricFamily(PREFIX + "rank_last_output_age_seconds",
                                 "seconds since the rank last printed a line", labels=["rank"])
        for rank, at in sorted(self._last_output.items()):
            ages.add_metric([str(rank)], now - at)
        yield ages
        yield GaugeMetricFamily(PREFIX + "steps_per_second", "group steps per second over the "
                                f"last {RATE_WINDOW:g} s of the current attempt",
                                value=self._rate(now))
        if self.restart_window > 0:
            while self._restart_times and self._restart_times[0] <= now - self.restart_window:
                self._restart_times.popleft()
        yield GaugeMetricFamily(PREFIX + "restarts_in_window", "relaunches within the last "
                                "restart_window seconds (what max_restarts is counted against)",
                                value=len(self._restart_times))
        if self._checkpoint is not None:  # absent, not 0, until a checkpoint is known
            step, at = self._checkpoint
            yield GaugeMetricFamily(PREFIX + "checkpoint_step", "step of the newest checkpoint "
                                    "known (selected at a launch, or saved by the built-in worker)",
                                    value=step)
            yield GaugeMetricFamily(PREFIX + "checkpoint_age_seconds", "seconds since the newest "
                                    "checkpoint known was written", value=now - at)

    def _forget_old_steps(self, now: float) -> None:
        while len(self._steps) > 1 and self._steps[0][0] < now - RATE_WINDOW:
            self._steps.popleft()

    def _rate(self, now: float) -> float:
        """Steps completed after the oldest step in the window, per second since it."""
        self._forget_old_steps(now)
        if len(self._steps) < 2:
            return 0.0
        (t0, s0), (_, s1) = self._steps[0], self._steps[-1]
        return (s1 - s0) / (now - t0)
