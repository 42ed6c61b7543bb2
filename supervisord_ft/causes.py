"""Why an attempt failed: each rank's evidence read as a cause, and the root told from its knock-ons.

The evidence is what the ranks leave: torchrun's error file (written by ``@record``), the
traceback on stderr, the exit status, the kernel's OOM kills counted by the rank's memory cgroup,
and the hang diagnosis. Every decision of the restart policy reads a :class:`Cause`, never a
stderr line. Pure functions, torch-free; evidence that is malformed, huge or stale lowers what
can be said (and says why in ``notes``), never raises.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from . import flight

# The vocabulary, documented once (docs/recovery.md's table is checked against it).
CAUSES: tuple[tuple[str, str], ...] = (
    ("exception", "a Python exception escaped the rank (read from its error file or its traceback "
                  "on stderr)"),
    ("oom", "the kernel's OOM killer killed the rank (its memory cgroup counted the kill)"),
    ("signal", "the rank died of a signal the daemon did not send: from outside (SIGKILL, "
               "SIGTERM) or its own fault (SIGSEGV, SIGABRT)"),
    ("exit_code", "the rank exited non-zero without a traceback"),
    ("hang", "the rank stopped making progress: declared hung, or alive and outside the "
             "collective its failed peers died in"),
    ("startup", "the rank never started: its spawn failed, its command was not found or not "
                "executable (126, 127), or no progress came within `startup_timeout`"),
    ("peer_lost", "every failed rank died of a lost peer and no root is in sight (another node's, "
                  "or one that vanished)"),
)
# Not the job's own doing: such a failure spends the budget and never proves a bug deterministic.
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                             signal.SIGQUIT, signal.SIGPIPE, signal.SIGALRM, signal.SIGUSR1,
                             signal.SIGUSR2, signal.SIGXCPU})
# How a rank dies of a peer's failure: gloo's transport, the NCCL watchdog, torch's store client.
KNOCK_ON = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting|"
                      r"timed out in (recv|send)|NCCL (communicator|watchdog)|Watchdog caught collective"
                      r"|ProcessGroupNCCL.*(timeout|abort)|DistNetworkError|ECONNRESET|"
                      r"Socket Timeout|failed to recv, got 0 bytes|Connection refused", re.IGNORECASE)
MAX_ERROR_FILE = 1 << 20  # torch writes a few KiB; a traceback of 10,000 frames is about 1 MiB
MAX_MESSAGE_CHARS = 500  # a cause's message: one screen line of an event
TAIL_LINES_FOR_KNOCK_ON = 40  # the last stderr lines searched for a lost peer without a traceback
# torch prefixes an uncaught exception's lines in a distributed rank with ``[rank1]: ``; torchrun's
# ``--tee`` and log_line_prefix_template with ``[default1]:``
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]: ?", re.MULTILINE)
_FRAME = re.compile(r'^\s*File "(.*)", line (\d+), in (.*)$')
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)(?::\s?(.*))?$")
_WARNING = re.compile(r"Warning\b|warnings\.warn|^\s*warn\(|\[W[\d ]|^\s*$")
CLOCK_SLACK = 2.0  # seconds an error file's stamp (whole seconds, wall clock) may precede its attempt


@dataclass(frozen=True)
class Traceback:
    exception: str  # the type as printed: ``ValueError``, ``torch.distributed.DistBackendError``
    message: str
    frames: tuple[flight.Frame, ...]  # outermost first, as Python prints them

    @property
    def where(self) -> str | None:
        """The innermost frame of the job's own code (not a library, not the standard library)."""
        own = flight.innermost_own(list(reversed(self.frames)))
        return str(own) if own is not None else None


@dataclass(frozen=True)
class Cause:
    """One rank's failure as its evidence tells it."""

    rank: int
    cause: str  # one of CAUSES
    message: str
    source: str  # error_file, stderr, exit_status, cgroup, diagnosis, watchdog or spawn
    exception: str | None = None
    where: str | None = None
    returncode: int | None = None
    knock_on: bool = False  # died of a peer's failure, not of its own
    at: float = 0.0  # when its exit was seen (monotonic): the earliest root is the root

    @property
    def outside(self) -> bool:
        """Not the job's own doing: a signal from outside, OOM, a hang, a lost peer."""
        if self.cause == "signal" and self.returncode is not None and self.returncode < 0:
            return -self.returncode in OUTSIDE_SIGNALS
        return self.cause in ("oom", "hang", "peer_lost")

    @property
    def signature(self) -> tuple[str, str | None, str | None]:
        """What makes two failures the same: the cause, what, and where. Without a traceback the
        message stands in for the place, unless it is the daemon's own (it counts seconds)."""
        if self.exception is not None:
            return self.cause, self.exception, self.where
        told = None if self.source in ("watchdog", "diagnosis") else self.message
        return self.cause, None if self.returncode is None else str(self.returncode), self.where or told

    def summary(self) -> str:
        """``ValueError at job.py:88 in load_batch: bad batch``, in a few words."""
        what = self.exception or {"oom": "killed by the OOM killer", "hang": "hung",
                                  "startup": "failed to start", "peer_lost": "lost a peer",
                                  }.get(self.cause, self.message)
        at = f" at {self.where}" if self.where else ""
        tail = f": {self.message}" if self.message and self.message != what else ""
        return f"{what}{at}{tail}"[:MAX_MESSAGE_CHARS]


@dataclass(frozen=True)
class Explanation:
    """An attempt's failure: the root cause, the ranks that died of it, what else failed."""

    root: Cause
    knock_on: tuple[int, ...] = ()  # ranks that died of the root's failure (a lost peer)
    also_failed: tuple[int, ...] = ()  # ranks that failed on their own too (every rank raised)
    notes: tuple[str, ...] = ()  # evidence that could not be used, and why

    @property
    def rank(self) -> int | None:
        return None if self.root.cause == "peer_lost" else self.root.rank


@dataclass(frozen=True)
class ErrorFile:
    traceback: Traceback | None
    note: str | None  # why it could not be used; None when it was, or was never written


def parse_traceback(text: str) -> Traceback | None:
    """The last traceback Python printed in ``text``: its exception, message and frames.

    A traceback whose head was cut off (a tail of 10,000 frames) still parses from its first
    whole frame; lines printed after it (a warning at exit) are not its message.
    """
    lines = _RANK_PREFIX.sub("", text).splitlines()
    head = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
               default=None)
    if head is None:
        head = next((i - 1 for i, line in enumerate(lines) if _FRAME.match(line)), None)
        if head is None:
            return None
    frames: list[flight.Frame] = []
    for line in lines[head + 1:]:
        if m := _FRAME.match(line):
            frames.append(flight.Frame(m[1], int(m[2]), m[3]))
        elif line[:1].isspace() or not line or line.startswith("[Previous line repeated"):
            continue  # source lines, carets, repeats
        elif frames and (m := _EXCEPTION.match(line)):
            return Traceback(m[1], (m[2] or "").strip()[:MAX_MESSAGE_CHARS], tuple(frames))
        else:
            break
    return None


def read_error_file(path: Path, not_before: float) -> ErrorFile:
    """What ``@record`` wrote to ``TORCHELASTIC_ERROR_FILE`` for this attempt (``not_before``:
    its launch, wall-clock seconds). Missing is no note: the script simply does not use it."""
    try:  # non-blocking: a FIFO put in its place must not stall the daemon
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return ErrorFile(None, None)
    except OSError as exc:
        return ErrorFile(None, f"error file not readable: {exc.strerror or exc}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ErrorFile(None, "error file is not a regular file")
        raw = os.read(fd, MAX_ERROR_FILE + 1)
    except OSError as exc:
        return ErrorFile(None, f"error file not readable: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if len(raw) > MAX_ERROR_FILE:
        return ErrorFile(None, f"error file over {MAX_ERROR_FILE} bytes: not read")
    try:
        doc = json.loads(raw.decode("utf-8", "replace"))
        message = doc["message"]
        if isinstance(message, str):  # torch's "new message format": the text alone
            text, info = message, {}
        else:
            text, info = str(message["message"]), message.get("extraInfo") or {}
        stamp = float(info["timestamp"]) if "timestamp" in info else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return ErrorFile(None, f"error file is not torchrun's JSON ({type(exc).__name__})")
    if stamp is not None and stamp < not_before - CLOCK_SLACK:
        return ErrorFile(None, f"error file written {not_before - stamp:.0f} s before this attempt "
                               "began: not its own")
    tb = parse_traceback(str(info.get("py_callstack") or ""))
    if tb is None:  # no stack: the message alone, "ValueError: bad batch"
        kind, _, rest = text.partition(": ")
        if not _EXCEPTION.match(kind):
            return ErrorFile(None, "error file names no exception")
        tb = Traceback(kind, rest.strip()[:MAX_MESSAGE_CHARS], ())
    return ErrorFile(tb, None)


def of_rank(rank: int, returncode: int, stderr: str, error_file: ErrorFile, oom_killed: bool,
            at: float) -> Cause:
    """The cause of one rank's own non-zero exit, from the best evidence it left."""
    # A traceback on stderr is the cause of an exit status, or of the rank's own abort (torch's
    # threads often abort the interpreter's exit after an uncaught exception: SIGABRT), never of
    # a signal from outside: a job may log a handled exception long before something kills it.
    # ``@record`` writes only the fatal one.
    own = returncode > 0 or (returncode < 0 and -returncode not in OUTSIDE_SIGNALS)
    tb = error_file.traceback or (parse_traceback(stderr) if own else None)
    source = "error_file" if error_file.traceback is not None else "stderr"
    if returncode == -signal.SIGKILL and oom_killed:
        return Cause(rank, "oom", "killed by the kernel's OOM killer", "cgroup", returncode=returncode, at=at)
    if tb is not None:
        return Cause(rank, "exception", tb.message, source, tb.exception, tb.where, returncode,
                     knock_on=bool(KNOCK_ON.search(f"{tb.exception}: {tb.message}")), at=at)
    tail = stderr.splitlines()[-TAIL_LINES_FOR_KNOCK_ON:]
    knock_on = any(KNOCK_ON.search(line) for line in tail)
    last = next((line.strip() for line in reversed(tail) if not _WARNING.search(line)), "")
    if returncode < 0:
        name = _signal_name(-returncode)
        # faulthandler's dump (torch's @record enables it) tells where a native fault struck
        own = flight.innermost_own(flight.main_thread(flight.parse_stacks(stderr)))
        return Cause(rank, "signal", f"died of {name}", "exit_status", None,
                     str(own) if own is not None else None, returncode, knock_on, at)
    cause = "startup" if returncode in (126, 127) else "exit_code"
    return Cause(rank, cause, last[:MAX_MESSAGE_CHARS] or f"exited with {returncode}", "exit_status",
                 returncode=returncode, knock_on=knock_on, at=at)


def raised(rank: int, stderr: str, error_file: ErrorFile, returncode: int, at: float) -> Cause | None:
    """The cause of a rank the teardown signalled, if it had failed by itself before: an
    exception it had raised (``stderr`` as it was when the signal was sent), still exiting."""
    tb = error_file.traceback or parse_traceback(stderr)
    if tb is None:
        return None
    return Cause(rank, "exception", tb.message, "error_file" if error_file.traceback else "stderr",
                 tb.exception, tb.where, returncode,
                 knock_on=bool(KNOCK_ON.search(f"{tb.exception}: {tb.message}")), at=at)


def explain(failed: list[Cause], stalled: list[Cause], notes: list[str] | None = None) -> Explanation:
    """The root of ``failed`` (ranks that failed on their own) and its knock-ons.

    The root is the earliest failure that is not a knock-on; if every failure is one, the root
    is the first of ``stalled`` (a live rank the diagnosis found outside the collective its
    peers died in), else no rank: ``peer_lost``.
    """
    roots = sorted((c for c in failed if not c.knock_on), key=lambda c: c.at)
    knock_on = tuple(sorted(c.rank for c in failed if c.knock_on))
    if roots:
        root = roots[0]
    elif stalled:
        root = stalled[0]
    elif failed:
        first = min(failed, key=lambda c: c.at)
        root = Cause(first.rank, "peer_lost", first.summary(), first.source, first.exception,
                     first.where, first.returncode, knock_on=True, at=first.at)
    else:
        raise ValueError("nothing failed")
    return Explanation(root, knock_on, tuple(sorted(c.rank for c in roots[1:])), tuple(notes or ()))


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"

