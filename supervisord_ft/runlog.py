"""The one reader of ``<run_dir>/events.jsonl``: what ``status`` and ``report`` know of a run.

The file is appended to by every daemon invocation that used the run dir and may be read while
one writes, so reading never fails on a line: a partial last line, a line that is not a JSON
object, or one without ``event`` and ``timestamp`` is skipped and counted; events and fields this
version does not know (a newer daemon's) are ignored. Events are grouped by ``run_id`` (see
:func:`new_run_id`); the latest run is the one whose first event comes last in the file. Events
from before run ids existed form one run per ``supervisor_start``. Torch- and matplotlib-free.

Times in a :class:`Run` are seconds since the run's first event, from the daemon's timestamps.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import procfs
from .checkpoints import parse_step
from .errors import ReaderError
from .logs import EVENTS_FILE
from .output import worker_field

STEP = "step"  # the worker_event of a step report (supervisord_ft_worker.contract.report_progress)
CHECKPOINT_SAVED = "checkpoint_saved"
FAILING = ("RECOVERING", "FAILED")  # states a failure leads to
Event = dict[str, Any]
READ_BLOCK = 4 << 20  # bytes read at once: the memory a read takes
MAX_LINE = 16 << 20  # no event is longer: a worker's line is cut at max_line_bytes, 1 MiB at most


def new_run_id() -> str:
    """Sortable by start time and unique in practice: the UTC second and 24 random bits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# -- reading ------------------------------------------------------------------------------------
@dataclass
class RunLog:
    """Every run in one events file, in the order they started, and what could not be read."""

    path: Path
    runs: dict[str, _Summary]
    skipped: int  # lines that were not an event (partial, not JSON, no event or timestamp)
    lines: int = 0
    decoded: int = 0  # lines decoded from JSON: all but those read(every_step=False) did without

    def select(self, run_id: str | None = None) -> tuple[str, _Summary]:
        """The latest run, or the one whose id is or starts with ``run_id``."""
        if run_id is None:
            return next(reversed(self.runs.items()))
        found = [r for r in self.runs if r == run_id] \
            or [r for r in self.runs if r.startswith(run_id)]
        if len(found) != 1:
            raise ReaderError(f"--run {run_id}: {'no' if not found else len(found)} runs in "
                              f"{self.path} match (it has {', '.join(self.runs)})")
        return found[0], self.runs[found[0]]


# The fields the summary reads, with the types it can use: a field of another type (a newer
# daemon's, a garbled line's) is dropped as if unknown. null is always allowed.
_NUMBER = (int, float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("attempt", "restart", "rank", "step", "returncode", "exit_code", "pid",
                     "restarts", "attempts"), (int,)),
    **dict.fromkeys(("silent_for", "timeout", "seconds", "loss"), _NUMBER),
    **dict.fromkeys(("run_id", "reason", "from", "to", "path", "resume_from", "line", "stream",
                     "worker_event", "state", "why", "host", "cause", "exception", "where",
                     "message", "summary", "stacks", "stacks_error"), (str,)),
    **dict.fromkeys(("config", "frames", "unanswered", "phases"), (dict,)),
    **dict.fromkeys(("laggards", "knock_on"), (list,)),
}


def _typed(ev: dict[str, Any]) -> Event:
    """``ev`` without the fields whose type the summary cannot use (bool is no number here)."""
    bad = [k for k, v in ev.items() if v is not None and k in FIELD_TYPES
           and (not isinstance(v, FIELD_TYPES[k]) or isinstance(v, bool))]
    for k in bad:
        del ev[k]
    return ev


def _event(raw: bytes) -> Event | None:
    """The line's event, or None for a line that is not one (a partial last line, garbage)."""
    try:
        ev = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(ev, dict) and isinstance(ev.get("event"), str) and _seconds(ev) is not None
    return _typed(ev) if ok else None


# How this version writes a worker's line (logs.py: compact JSON, these keys in this order).
# Lines of that shape whose content the summary can do without are recognised by these bytes
# and not decoded: at a few hundred thousand lines a second, a multi-day run's gigabyte of
# output is the whole cost of ``status``. A line of any other shape is decoded.
_OUTPUT = b',"event":"worker_output",'
_STEP = b'"worker_event":"step"'
_CHECKPOINT = b'"worker_event":"checkpoint_saved"'
_STDERR_TEXT = b',"stream":"stderr","line":"'
_BLANK = b'"line":""'
_RANK = re.compile(rb',"rank":(-?\d+),')
_SOUGHT = (b'"worker_event":"', _STDERR_TEXT)  # in the lines _hold may keep
_WHOLE_STEP = re.compile(rb'"worker_step":\d+[,}]')


class _Scan:
    """Reads the lines of an events file, in order, into one :class:`_Summary` per run.

    With ``every_step`` False (``status``), a rank's step reports after its first in an
    attempt, and its stderr lines, are held back, only the latest of each, and decoded just
    before the next event that is decoded: the summary then sees what it would have seen of
    them (a rank's first and latest step in each stretch, its last stderr line before a
    failure), in constant memory, without decoding the rest. A block of lines that are all the
    current attempt's output is searched for those lines as a whole (the common case, at the
    speed of ``bytes.count``); any other block is read line by line."""

    def __init__(self, every_step: bool) -> None:
        self.every_step = every_step
        self.runs: dict[str, _Summary] = {}
        self.skipped = self.unnamed = self.lines = self.decoded = 0
        self.offset = 0  # of the line being read, in the file: the order of held lines
        self.run: _Summary | None = None  # the run of the last decoded event
        self.tag = b""  # its id, as its lines hold it
        self.held: dict[tuple[bool, int], tuple[int, bytes]] = {}  # (stderr?, rank) -> (offset, line)

    def block(self, block: bytes) -> None:
        """Whole lines, each ending in ``\\n``."""
        run, lines = self.run, block.count(b"\n")
        if run is not None and not self.every_step and run.attempt_tag is not None \
                and block.count(_OUTPUT) == block.count(self.tag) == block.count(run.attempt_tag) == lines:
            base, last = self.offset, -1
            for at in sorted(_found(block, _SOUGHT)):
                start = block.rfind(b"\n", 0, at) + 1
                if start != last:
                    last, self.offset = start, base + start
                    if not self._keep(raw := block[start:block.index(b"\n", at) + 1], run):
                        self._flush()
                        self._decode(raw)
            run.tail = block[block.rfind(b"\n", 0, len(block) - 1) + 1:]
            self.offset, self.lines = base + len(block), self.lines + lines
            return
        for raw in io.BytesIO(block):
            self.line(raw)

    def line(self, raw: bytes) -> None:
        self.lines += 1
        self._line(raw, self.run)
        self.offset += len(raw)

    def _line(self, raw: bytes, run: _Summary | None) -> None:
        if run is not None and not self.every_step and self._hold(raw, run):
            return
        self._flush()
        self._decode(raw)

    def end(self) -> dict[str, _Summary]:
        self._flush()
        for run in self.runs.values():
            run.close()
        return self.runs

    def _hold(self, raw: bytes, run: _Summary) -> bool:
        """True if ``raw`` is a line of the current run and attempt that need not be decoded now."""
        if raw.find(_OUTPUT, 0, 100) < 0 or self.tag not in raw or run.attempt_tag is None \
                or run.attempt_tag not in raw:
            return False
        return self._keep(raw, run)

    def _keep(self, raw: bytes, run: _Summary) -> bool:
        """:meth:`_hold` for a line known to be the current attempt's output."""
        if not raw.endswith(b"}\n"):
            return False
        stderr = _STDERR_TEXT in raw
        if _STEP not in raw and not stderr:
            if _CHECKPOINT in raw:
                return False
            run.tail = raw  # nothing the summary reads but its time
            return True
        if stderr and _BLANK in raw:
            return True
        if (m := _RANK.search(raw)) is None or not (stderr or _WHOLE_STEP.search(raw)):
            return False
        rank = int(m[1])
        if not stderr and rank not in run.stepped:
            return False  # a rank's first step of the attempt: decoded now
        self.held[(stderr, rank)] = (self.offset, raw)
        return True

    def _flush(self) -> None:
        if self.held:
            held = sorted(self.held.values())
            self.held.clear()
            for _, raw in held:
                self._decode(raw)

    def _decode(self, raw: bytes) -> None:
        if not raw.strip():
            return
        self.decoded += 1
        if (ev := _event(raw)) is None:
            self.skipped += 1
            return
        run_id = ev.get("run_id")
        if not isinstance(run_id, str):  # written before run ids existed
            self.unnamed += ev["event"] == "supervisor_start"
            run_id = f"unnamed-{max(self.unnamed, 1)}"
        if (run := self.runs.get(run_id)) is None:
            run = self.runs[run_id] = _Summary(ev)
        if run is not self.run:
            self.run, self.tag = run, json.dumps({"run_id": run_id}, separators=(",", ":"))[1:-1].encode()
        run.feed(ev)


def _found(block: bytes, needles: tuple[bytes, ...]) -> Iterator[int]:
    """Where each of ``needles`` occurs in ``block`` (``bytes.find``: a regex alternation is 10
    times slower)."""
    for needle in needles:
        at = block.find(needle)
        while at >= 0:
            yield at
            at = block.find(needle, at + 1)


def read(run_dir: Path, every_step: bool = True) -> RunLog:
    """Read ``run_dir``'s events, streaming; :class:`ReaderError` if it holds none. With
    ``every_step`` False, each rank's step reports are read only as far as the summary needs
    them (its first and latest of each stretch: not the report's plots), in constant memory."""
    path = run_dir / EVENTS_FILE
    scan = _Scan(every_step)
    try:
        with open(path, "rb", buffering=0) as fh:
            rest = b""
            while block := fh.read(READ_BLOCK):
                block = rest + block
                cut = block.rfind(b"\n") + 1
                rest = block[cut:]
                scan.block(block[:cut])
                if len(rest) > MAX_LINE:  # no event is that long: garbage, skipped to its end
                    scan.skipped, rest = scan.skipped + 1, b""
                    while (block := fh.read(READ_BLOCK)) and (cut := block.find(b"\n") + 1) == 0:
                        pass
                    rest = block[cut:]
            if rest:  # a partial last line: being written, or cut
                scan.line(rest)
    except FileNotFoundError:
        raise ReaderError(f"{run_dir}: no {EVENTS_FILE} (not a run dir, or no run started there)")
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read: {exc.strerror}")
    runs = scan.end()
    if not runs:
        raise ReaderError(f"{path}: no events")
    return RunLog(path, runs, scan.skipped, scan.lines, scan.decoded)


def _seconds(ev: Event) -> float | None:
    try:
        return datetime.fromisoformat(ev["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


# -- summarising --------------------------------------------------------------------------------
@dataclass
class Point:
    """One step report of one rank."""

    t: float
    step: int
    loss: float | None
    attempt: int | None


@dataclass
class Diagnosis:
    """What the live ranks were doing when a hang was declared or a rank failed, as the
    ``hang_diagnosed`` or ``failure_diagnosed`` event says; fields it lacks or garbles are empty."""

    kind: str  # "hang" or "failure"
    summary: str | None  # one line: where the laggards are, where the others wait
    laggards: list[int]  # may be empty: none named
    stacks: str | None  # the directory of rank-<R>.txt files; None if they were not written
    stacks_error: str | None  # why they were not
    frames: dict[str, list[str]]  # rank -> its main thread's innermost frames, innermost first
    unanswered: dict[str, list[str]]  # rank -> what could not be got from it


@dataclass
class Explained:
    """An attempt's root cause, as its ``failure_explained`` event says; fields it lacks or
    garbles are empty."""

    cause: str | None  # one of causes.CAUSES
    rank: int | None  # the root's; None when no root was in sight (peer_lost)
    exception: str | None
    where: str | None  # file:line in function
    message: str | None
    knock_on: list[int]  # ranks that died of it

    @classmethod
    def of(cls, ev: Event) -> Explained:
        def text(value: Any) -> str | None:
            return value if isinstance(value, str) else None

        rank, knock_on = ev.get("rank"), ev.get("knock_on")
        return cls(text(ev.get("cause")), rank if isinstance(rank, int) else None,
                   text(ev.get("exception")), text(ev.get("where")), text(ev.get("message")),
                   [r for r in knock_on if isinstance(r, int)] if isinstance(knock_on, list) else [])

    def text(self) -> str:
        """``rank 1: exception ValueError at job.py:88 in load_batch: no batch (ranks 0 died of it)``"""
        who = f"rank {self.rank}" if self.rank is not None else "no rank in sight"
        what = " ".join(x for x in (self.cause, self.exception, f"at {self.where}" if self.where else None) if x)
        out = f"{who}: {what or 'unexplained'}"
        if self.message and self.message != self.exception:
            out += f": {self.message}"
        if self.knock_on:
            out += f" ({'ranks' if len(self.knock_on) > 1 else 'rank'} " \
                   f"{', '.join(map(str, self.knock_on))} died of it)"
        return out


@dataclass
class Attempt:
    """One launch of the group and, if it failed, how the run got past the failure."""

    id: int
    restart: int | None
    launched_at: float
    resumed_from: str | None  # checkpoint path; None on a fresh start
    resumed_step: int  # 0 on a fresh start
    first_step_at: float | None = None
    last_step: int | None = None
    cause: str | None = None  # the loop's reason for leaving RUNNING towards RECOVERING/FAILED
    failed_rank: int | None = None
    last_stderr: str | None = None  # the failed rank's last stderr line in this attempt
    failed_at: float | None = None  # the failing exit, or the hung rank's last output
    detected_at: float | None = None  # the loop's transition to RECOVERING or FAILED
    teardown_done_at: float | None = None
    teardown_seconds: float | None = None
    hung: bool = False  # ended by a hang: every live rank was declared hung
    hang_timeout: float | None = None  # the hang limit in force then (s)
    diagnosis: Diagnosis | None = None
    explained: Explained | None = None
    # Filled from the next attempt once there is one:
    phases: dict[str, float] | None = None  # where the recovery's time went (recovered.phases)
    relaunched_at: float | None = None
    downtime: float | None = None  # failure -> the next attempt's first step
    steps_redone: int | None = None  # this attempt's highest step - the next one's resumed step
    resumed_by_next: str | None = None


@dataclass
class Checkpoint:
    t: float
    step: int | None
    path: str | None


@dataclass
class Goodput:
    """Useful steps per second against the fault-free rate (docs/operations.md, "Status and report": goodput)."""

    useful_steps: int  # final step - the step the run started from
    wall_seconds: float  # first launch -> last event
    steps_per_second: float | None  # useful_steps / wall_seconds
    fault_free_steps_per_second: float | None  # median rate of the attempts' stepping stretches
    ratio: float | None  # steps_per_second / fault_free_steps_per_second
    # Where the rest of the wall time went:
    startup_seconds: float | None  # first launch -> first step
    downtime_seconds: float  # the failures' downtimes, summed
    steps_redone: int  # summed over the failures


@dataclass
class Run:
    run_id: str
    path: str
    run_index: int  # 1 for the first run in the file
    runs_in_file: int
    skipped_lines: int
    started: str  # ISO timestamp of the run's first event
    pid: int | None
    host: str | None
    state: str | None  # the state machine's last state
    daemon: str  # "exited", "running", "gone" (died without supervisor_exit), or "elsewhere"
    exit_code: int | None
    step: int | None  # the highest step any rank reported
    total_steps: int | None  # known for the built-in job
    restarts: int
    attempts: list[Attempt]
    last_failure: dict[str, Any] | None
    checkpoint: Checkpoint | None  # the newest one saved or selected
    checkpoints: list[Checkpoint]  # every one saved (the built-in worker reports them)
    goodput: Goodput | None
    series: dict[int, list[Point]] = field(repr=False)  # per rank

    def to_dict(self, series: bool = False) -> dict[str, Any]:
        """JSON-ready, times to the millisecond; the series only when asked (they are long)."""
        out = asdict(self)
        if not series:
            del out["series"], out["checkpoints"]
        return _rounded(out)


def failure_text(f: dict[str, Any]) -> str:
    """A failure in one line: its explained cause (else the loop's reason and the rank's last
    stderr line), how it ended, and where the recovery's time went."""
    if f.get("explained"):
        text = f["explained"]
    else:
        text = str(f["reason"])
        if f.get("last_stderr"):
            text += f": {f['last_stderr']}"
    if f.get("outcome"):
        text += f"; {f['outcome']}"
    if f.get("phases"):
        text += "; recovery " + phases_text(f["phases"])
    return text


def phases_text(phases: dict[str, Any]) -> str:
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items() if _number(seconds))


def laggards_text(d: Diagnosis) -> str:
    if not d.laggards:
        return "none named"
    return f"rank{'s' if len(d.laggards) > 1 else ''} " + ", ".join(map(str, d.laggards))


def stacks_text(d: Diagnosis) -> str:
    """The stack files' directory, or why they were not written (the daemon's words)."""
    return d.stacks or d.stacks_error or "not written"


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


class _Summary:
    """Walks one run's events once, in order; each known event updates what it concerns."""

    def __init__(self, first: Event) -> None:
        self.started: str = first["timestamp"]
        self.t0 = _seconds(first) or 0.0
        self.start: Event = {}
        self.exit: Event | None = None
        self.state: str | None = None
        self.attempts: dict[int, Attempt] = {}
        self.selected: Checkpoint | None = None
        self.checkpoint: Checkpoint | None = None
        self.saved: list[Checkpoint] = []
        self.series: dict[int, list[Point]] = {}
        self.stderr: dict[tuple[Any, Any], str] = {}
        self.silent: dict[tuple[Any, Any], float] = {}  # (attempt, rank) -> when it went silent
        self.failure: dict[str, Any] | None = None
        self.t = self.last_t = 0.0
        # For _Scan: the latest attempt, as its lines hold it, the ranks that reported a step
        # in it, and the latest line that was not decoded (only its time counts).
        self.current: Attempt | None = None
        self.attempt_tag: bytes | None = None
        self.stepped: set[Any] = set()
        self.tail: bytes | None = None

    def feed(self, ev: Event) -> None:
        self.t = self.last_t = (_seconds(ev) or self.t0) - self.t0
        handler = getattr(self, "on_" + ev["event"], None)
        if handler is not None:
            handler(ev)

    def close(self) -> None:
        """The run's last line counts for its duration, decoded or not."""
        if self.tail is not None and (ev := _event(self.tail)) is not None:
            self.last_t = max(self.last_t, (_seconds(ev) or self.t0) - self.t0)

    def _attempt(self, ev: Event) -> Attempt | None:
        return self.attempts.get(ev.get("attempt"))  # type: ignore[arg-type]

    def on_supervisor_start(self, ev: Event) -> None:
        self.start = ev

    def on_supervisor_exit(self, ev: Event) -> None:
        self.exit = ev
        self.state = ev.get("state", self.state)

    def on_checkpoint_selected(self, ev: Event) -> None:
        self.selected = Checkpoint(self.t, ev.get("step"), ev.get("path"))
        if self.selected.step is not None:
            self._newest(self.selected)

    def _newest(self, ck: Checkpoint) -> None:
        if self.checkpoint is None or (ck.step or 0) >= (self.checkpoint.step or 0):
            self.checkpoint = ck

    def on_launching(self, ev: Event) -> None:
        path = ev.get("resume_from")
        step = self.selected.step if self.selected and self.selected.path == path else None
        if step is None and path:
            step = parse_step(Path(path).name)
        a = Attempt(ev.get("attempt", len(self.attempts)), ev.get("restart"), self.t, path,
                    step or 0)
        self.current, self.stepped = a, set()
        self.attempt_tag = b'"attempt":%d,' % a.id if isinstance(a.id, int) else None
        if (before := self.attempts.get(a.id - 1)) is not None:
            before.relaunched_at = self.t
            before.resumed_by_next = path
            if before.last_step is not None:
                before.steps_redone = max(before.last_step - a.resumed_step, 0)
        self.attempts[a.id] = a

    def on_state_changed(self, ev: Event) -> None:
        self.state = ev.get("to", self.state)
        if self.state not in FAILING:
            return
        if ev.get("from") == "RECOVERING":  # the end of a recovery, not a new failure
            if self.failure is not None:
                self.failure["outcome"] = ev.get("reason")
            return
        a = self._attempt(ev)
        self.failure = {"reason": ev.get("reason"), "at": self.t, "attempt": ev.get("attempt"),
                        "rank": None, "last_stderr": None, "outcome": None, "explained": None,
                        "phases": None}
        if a is not None:
            a.cause, a.detected_at = ev.get("reason"), self.t
            if a.failed_at is None:  # a spawn failure: no exit to date it by
                a.failed_at = self.t
            self.failure.update(rank=a.failed_rank, last_stderr=a.last_stderr)

    def _failed(self, ev: Event, at: float) -> None:
        a = self._attempt(ev)
        if a is not None and a.failed_at is None and a.detected_at is None:
            a.failed_at, a.failed_rank = at, ev.get("rank")
            a.last_stderr = self.stderr.get((a.id, a.failed_rank))

    def on_worker_exited(self, ev: Event) -> None:
        if ev.get("returncode") != 0:
            self._failed(ev, self.t)

    def on_hang_detected(self, ev: Event) -> None:
        """One per live rank, the longest silent first; the diagnosis may blame another."""
        silent = ev.get("silent_for")
        at = self.t - silent if _number(silent) else self.t
        self.silent[(ev.get("attempt"), ev.get("rank"))] = at
        self._failed(ev, at)
        if (a := self._attempt(ev)) is not None:
            a.hung = True
            if _number(timeout := ev.get("timeout")):
                a.hang_timeout = timeout

    def on_hang_diagnosed(self, ev: Event) -> None:
        a = self._attempt(ev)
        if a is None:
            return
        a.diagnosis = _diagnosis("hang", ev)
        # As the loop does: the rank to blame is the first laggard, if it was declared hung.
        blamed = a.diagnosis.laggards[:1]
        at = self.silent.get((a.id, blamed[0])) if blamed else None
        if at is not None and a.detected_at is None:
            a.failed_at, a.failed_rank = at, blamed[0]
            a.last_stderr = self.stderr.get((a.id, a.failed_rank))

    def on_failure_explained(self, ev: Event) -> None:
        if (a := self._attempt(ev)) is None:
            return
        a.explained = Explained.of(ev)
        if self.failure is not None and self.failure.get("attempt") == a.id:
            self.failure["explained"] = a.explained.text()

    def on_recovered(self, ev: Event) -> None:
        phases = ev.get("phases")
        if (a := self._attempt(ev)) is None or not isinstance(phases, dict):
            return
        if (before := self.attempts.get(a.id - 1)) is not None:
            before.phases = {str(k): v for k, v in phases.items() if _number(v)}
            if self.failure is not None and self.failure.get("attempt") == before.id:
                self.failure["phases"] = before.phases

    def on_failure_diagnosed(self, ev: Event) -> None:
        if (a := self._attempt(ev)) is not None:
            a.diagnosis = _diagnosis("failure", ev)

    def on_teardown(self, ev: Event) -> None:
        if (a := self._attempt(ev)) is not None and ev.get("why") == "recovery":
            a.teardown_done_at, a.teardown_seconds = self.t, ev.get("seconds")

    def on_worker_output(self, ev: Event) -> None:
        kind = ev.get("worker_event")
        if kind == STEP and isinstance(step := _worker_field(ev, "step"), int):
            loss = ev.get("loss")
            point = Point(self.t, step, loss if isinstance(loss, (int, float)) else None,
                          ev.get("attempt"))
            self.series.setdefault(ev.get("rank", -1), []).append(point)
            if (a := self._attempt(ev)) is not None:
                if self.attempt_tag is not None and a is self.current:
                    self.stepped.add(ev.get("rank"))
                if a.first_step_at is None:
                    a.first_step_at = self.t
                    if (before := self.attempts.get(a.id - 1)) and before.failed_at is not None:
                        before.downtime = self.t - before.failed_at
                a.last_step = max(a.last_step or step, step)
        elif kind == CHECKPOINT_SAVED:
            ck = Checkpoint(self.t, _worker_field(ev, "step"), _worker_field(ev, "path"))
            self.saved.append(ck)
            self._newest(ck)
        elif ev.get("stream") == "stderr" and isinstance(line := ev.get("line"), str):
            if line.strip():
                self.stderr[(ev.get("attempt"), ev.get("rank"))] = line

    def goodput(self, step: int | None) -> Goodput | None:
        if step is None or not self.attempts:
            return None
        start = min(self.attempts.values(), key=lambda a: a.id)
        wall = self.last_t - start.launched_at
        rates = [(p[-1].step - p[0].step) / (p[-1].t - p[0].t)
                 for points in self.series.values() for p in stretches(points)
                 if len(p) > 1 and p[-1].t > p[0].t]
        useful = step - start.resumed_step
        rate = useful / wall if wall > 0 else None
        fault_free = statistics.median(rates) if rates else None
        failed = [a for a in self.attempts.values() if a.downtime is not None]
        return Goodput(useful, wall, rate, fault_free,
                       rate / fault_free if rate is not None and fault_free else None,
                       start.first_step_at - start.launched_at if start.first_step_at else None,
                       sum((a.downtime or 0.0 for a in failed), 0.0),
                       sum(a.steps_redone or 0 for a in self.attempts.values()))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _diagnosis(kind: str, ev: Event) -> Diagnosis:
    """A diagnosis event's fields, each checked: a newer or older daemon's may differ."""
    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    def by_rank(value: Any) -> dict[str, list[str]]:
        if not isinstance(value, dict):
            return {}
        return {str(r): [str(x) for x in v] if isinstance(v, list) else [str(v)]
                for r, v in value.items()}

    laggards = ev.get("laggards")
    return Diagnosis(kind, text(ev.get("summary")),
                     [r for r in laggards if isinstance(r, int) and not isinstance(r, bool)]
                     if isinstance(laggards, list) else [],
                     text(ev.get("stacks")), text(ev.get("stacks_error")),
                     by_rank(ev.get("frames")), by_rank(ev.get("unanswered")))


def stretches(points: list[Point]) -> Iterator[list[Point]]:
    """One rank's step reports cut into one list per attempt."""
    by_attempt: dict[Any, list[Point]] = {}
    for p in points:
        by_attempt.setdefault(p.attempt, []).append(p)
    return iter(by_attempt.values())


def summarise(log: RunLog, run_id: str | None = None) -> Run:
    """What the chosen run (the latest by default) did, as far as its events tell."""
    rid, s = log.select(run_id)
    steps = [p.step for points in s.series.values() for p in points]
    step = max(steps, default=None)
    cfg = s.start.get("config") if isinstance(s.start.get("config"), dict) else {}
    epochs, per_epoch = cfg.get("epochs"), cfg.get("steps")
    builtin = not cfg.get("command") and isinstance(epochs, int) and isinstance(per_epoch, int)
    total = epochs * per_epoch if builtin else None
    restarts = s.exit.get("restarts") if s.exit else \
        max((a.restart or 0 for a in s.attempts.values()), default=0)
    pid, host = s.start.get("pid"), s.start.get("host")
    return Run(
        run_id=rid, path=str(log.path), run_index=list(log.runs).index(rid) + 1,
        runs_in_file=len(log.runs), skipped_lines=log.skipped,
        started=s.started, pid=pid, host=host, state=s.state,
        daemon=_daemon(s.exit is not None, pid, host, s.t0),
        exit_code=s.exit.get("exit_code") if s.exit else None, step=step, total_steps=total,
        restarts=restarts if isinstance(restarts, int) else 0,
        attempts=sorted(s.attempts.values(), key=lambda a: a.id), last_failure=s.failure,
        checkpoint=s.checkpoint, checkpoints=s.saved, goodput=s.goodput(step), series=s.series)


# -- is the daemon alive? -----------------------------------------------------------------------
def _daemon(exited: bool, pid: Any, host: Any, started: float) -> str:
    if exited:
        return "exited"
    if host is not None and host != socket.gethostname():
        return "elsewhere"  # its pid means nothing here
    return "running" if isinstance(pid, int) and pid_is(pid, started) else "gone"


def pid_is(pid: int, started: float) -> bool:
    """True if ``pid`` is alive and is the process that logged its first event at ``started``.

    A pid is reused once its process dies; a reuser started after ``started`` (the original was
    alive then), so a process that started later is another one. A zombie runs no code.
    """
    st = procfs.stat(pid)
    if st is None or st.zombie:
        return False
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - st.start_ticks / procfs.CLK_TCK
    return time.time() - age <= started + 1.0  # slack for clock ticks and wall-clock steps


def _worker_field(ev: Event, key: str) -> Any:
    """A worker's own field; logs written before keys were renamed hold it unprefixed."""
    value = worker_field(ev, key)
    return ev.get(key) if value is None else value
