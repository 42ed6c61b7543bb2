"""What torch records of a rank, read as facts: its flight-recorder trace and its threads' stacks.

Pure functions over the bytes a rank's channel answers (or ``py-spy dump`` prints); torch-free.
Anything malformed is a ``ValueError`` for the caller to report, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# Collectives numbered below this in a process group are start-up (init barriers, DDP's
# parameter broadcast), not the training's rhythm: their gaps are not learnt as its cadence.
WARMUP_COLLECTIVES = 10
_LIBRARY = re.compile(r"/(site|dist)-packages/|/lib/python\d+\.\d+/|^<frozen ")


@dataclass(frozen=True)
class Group:
    """One process group as one rank sees it."""

    pg: str
    name: str
    enqueued: int  # the newest collective this rank entered (collective_seq_id)
    completed: int  # the newest it saw retire
    op: str | None  # what the newest one is (``all_reduce``), if it is in the trace

    @property
    def waiting(self) -> bool:
        return self.enqueued > self.completed


@dataclass(frozen=True)
class Trace:
    groups: dict[str, Group]
    newest_ns: int | None  # wall-clock ns at which the newest recorded collective was enqueued
    # (seconds, ns of the later one) between consecutive collectives of a group, warm-up excluded
    gaps: tuple[tuple[float, int], ...]
    entries: tuple[dict[str, Any], ...]

    @property
    def counter(self) -> int:
        """Grows with every collective entered or retired, in any group."""
        return sum(g.enqueued + g.completed for g in self.groups.values())

    def waiting_in(self) -> Group | None:
        return next((g for g in self.groups.values() if g.waiting), None)


def parse_trace(body: bytes) -> Trace:
    """torch's ``fr_trace_json`` answer (version 2.x) as a :class:`Trace`; ValueError if it is not."""
    try:
        return _trace(json.loads(body))
    except (TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def _trace(doc: Any) -> Trace:
    if not isinstance(doc, dict):
        raise ValueError("a flight-recorder trace is a JSON object")
    entries = [e for e in doc.get("entries") or () if isinstance(e, dict)]
    last: dict[str, dict[str, Any]] = {}
    created: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        pg = str(e.get("pg_id"))
        seq, t = int(e.get("collective_seq_id", 0)), int(e.get("time_created_ns", 0))
        if pg not in last or seq >= int(last[pg].get("collective_seq_id", 0)):
            last[pg] = e
        created.setdefault(pg, []).append((seq, t))
    groups = {}
    for pg, status in (doc.get("pg_status") or {}).items():
        newest = last.get(str(pg))
        name = newest["process_group"][1] if newest and len(newest.get("process_group") or ()) > 1 else ""
        op = _op(newest.get("profiling_name")) if newest else None
        groups[str(pg)] = Group(str(pg), str(name), int(status.get("last_enqueued_collective", -1)),
                                int(status.get("last_completed_collective", -1)), op)
    gaps = []
    for seqs in created.values():
        seqs.sort()
        gaps += [((b[1] - a[1]) / 1e9, b[1]) for a, b in zip(seqs, seqs[1:])
                 if a[0] >= WARMUP_COLLECTIVES and b[0] == a[0] + 1 and b[1] >= a[1] > 0]
    newest_ns = max((t for seqs in created.values() for _, t in seqs if t > 0), default=None)
    return Trace(groups, newest_ns, tuple(gaps), tuple(entries))


def _op(profiling_name: Any) -> str | None:
    """``gloo:all_reduce`` → ``all_reduce``."""
    return str(profiling_name).rpartition(":")[2] or None if profiling_name else None


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    @property
    def library(self) -> bool:
        return bool(_LIBRARY.search(self.file))

    def __str__(self) -> str:
        return f"{self.file.rpartition('/')[2]}:{self.line} in {self.function}"


_FAULTHANDLER = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
_PYSPY = re.compile(r"^\s+(.*) \((.*):(\d+)\)$")
_THREAD = re.compile(r"^(Current thread|Thread) ")


def parse_stacks(text: str) -> list[list[Frame]]:
    """Each thread's frames, innermost first, from faulthandler's or ``py-spy dump``'s text."""
    threads: list[list[Frame]] = []
    for line in text.splitlines():
        if _THREAD.match(line):
            threads.append([])
        elif threads and (m := _FAULTHANDLER.match(line)):
            threads[-1].append(Frame(m[1], int(m[2]), m[3]))
        elif threads and (m := _PYSPY.match(line)):
            threads[-1].append(Frame(m[2], int(m[3]), m[1]))
    return [t for t in threads if t]


def main_thread(threads: list[list[Frame]]) -> list[Frame]:
    """The thread that runs the script: the one whose outermost frame is ``<module>``."""
    return next((t for t in threads if t[-1].function == "<module>"),
                max(threads, key=len, default=[]))


def in_collective(frames: list[Frame]) -> bool:
    return any(f.file.endswith("distributed_c10d.py") for f in frames)


def innermost_own(frames: list[Frame]) -> Frame | None:
    """The innermost frame of the user's own code (not the standard library or a package)."""
    return next((f for f in frames if not f.library), frames[0] if frames else None)
