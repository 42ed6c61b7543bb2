"""Diagnose a group before any signal: every live rank's stacks and collectives, and who lags.

Asked of every rank at once, each answer bounded by :data:`ASK_TIMEOUT`; a rank that does not
answer is read from outside with ``py-spy dump`` when it is installed (bounded by
:data:`PYSPY_TIMEOUT`), so the whole collection costs at most their sum before the teardown.
The laggards are the ranks not inside the collective the others wait in, or behind it on
sequence numbers. One text file per rank (all threads' stacks, its last collectives, what could
not be got) goes under the run dir, written off the loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import blocking, flight
from .channel import NO_SOCKET, ChannelError, ask

ASK_TIMEOUT = 0.5  # a rank's C++ server answers in milliseconds, even while Python spins
PYSPY_TIMEOUT = 3.0  # py-spy attaches, reads and detaches in well under a second
# py-spy processes at once. Each costs the CPU of a short attach and two descriptors: 1,024 at
# once, for a hang of ranks without a channel, ran the daemon out of descriptors (an unhandled
# EMFILE in the diagnosis). Ranks still waiting at PYSPY_TIMEOUT are said not reached.
PYSPY_AT_ONCE = 16
WRITE_TIMEOUT = 2.0  # the files are small; a stalled run dir must not hold the teardown
LAST_COLLECTIVES = 8  # per rank file
NO_CHANNEL = "no channel"
# What a rank that serves no channel (not Python, no torch, or the channel off) leaves as problems.
SERVES_NONE = frozenset({NO_CHANNEL, f"channel: {NO_SOCKET}"})


@dataclass
class RankReport:
    rank: int
    pid: int
    stacks: str | None = None
    stacks_from: str | None = None  # "channel" or "py-spy"
    trace: flight.Trace | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def frames(self) -> list[flight.Frame]:
        return flight.main_thread(flight.parse_stacks(self.stacks or ""))

    def waiting(self) -> flight.Group | None:
        return self.trace.waiting_in() if self.trace is not None else None

    @property
    def empty(self) -> bool:
        """Nothing was got from it because it serves no channel: its file would say only that."""
        return self.stacks is None and self.trace is None and set(self.problems) <= SERVES_NONE

    def in_collective(self) -> bool:
        return self.waiting() is not None or (self.trace is None and flight.in_collective(self.frames))


@dataclass(frozen=True)
class Diagnosis:
    laggards: list[int]
    summary: str
    reports: dict[int, RankReport]

    def frames(self, most: int = 5) -> dict[int, list[str]]:
        """The innermost frames of each laggard's main thread (of every rank if none lags)."""
        ranks = self.laggards or sorted(self.reports)
        return {r: [str(f) for f in self.reports[r].frames[:most]] for r in ranks}


async def collect(socket_of: Mapping[int, str], pids: Mapping[int, int],
                  outside: bool) -> dict[int, RankReport]:
    """Every rank's report, asked in parallel; bounded by ASK_TIMEOUT + PYSPY_TIMEOUT.

    ``outside``: read with py-spy every rank that gave no stack (a hang); otherwise only a rank
    whose channel exists but did not answer, so that a crash of a job without channels (not
    Python, no torch) is not recovered later by the time py-spy takes."""
    pyspy = asyncio.Semaphore(PYSPY_AT_ONCE)
    reports = await asyncio.gather(*(_one(r, socket_of.get(r), pid, outside, pyspy)
                                     for r, pid in pids.items()))
    return {r.rank: r for r in reports}


async def _one(rank: int, path: str | None, pid: int, outside: bool, pyspy: asyncio.Semaphore) -> RankReport:
    report = RankReport(rank, pid)
    if path is None:
        report.problems.append(NO_CHANNEL)
    else:
        stacks, trace = await asyncio.gather(ask(path, "dump_traceback", ASK_TIMEOUT),
                                             ask(path, "fr_trace_json", ASK_TIMEOUT),
                                             return_exceptions=True)
        if isinstance(stacks, ChannelError) and isinstance(trace, ChannelError) and str(stacks) == str(trace):
            report.problems.append(f"channel: {stacks}")
        elif isinstance(stacks, ChannelError):
            report.problems.append(f"stacks: {stacks}")
        elif not isinstance(stacks, BaseException):
            report.stacks, report.stacks_from = stacks.body.decode("utf-8", "replace"), "channel"
            if stacks.truncated:
                report.problems.append(f"stacks: cut at {len(stacks.body)} bytes")
        if isinstance(trace, ChannelError) and not report.problems[-1:] == [f"channel: {trace}"]:
            report.problems.append(f"collectives: {trace}")
        elif not isinstance(trace, BaseException):
            try:
                report.trace = flight.parse_trace(trace.body)
            except ValueError as exc:
                report.problems.append(f"collectives: not a flight-recorder trace ({exc})"[:200])
    if report.stacks is None and (outside or (path is not None and os.path.exists(path))):
        await _pyspy(report, pyspy)
    return report


async def _pyspy(report: RankReport, at_once: asyncio.Semaphore) -> None:
    # On PATH, or beside our interpreter: a venv's bin/ is not on PATH unless it was activated.
    exe = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if exe is None:
        report.problems.append("py-spy: not installed")
        return
    proc = None
    try:
        async with asyncio.timeout(PYSPY_TIMEOUT):
            try:
                async with at_once:
                    proc = await asyncio.create_subprocess_exec(
                        exe, "dump", "--pid", str(report.pid), stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                    out, _ = await proc.communicate()
            except OSError as exc:  # EMFILE, EAGAIN: this rank goes without, the others do not
                report.problems.append(f"py-spy: not started: {exc}"[:200])
                return
    except TimeoutError:
        report.problems.append(f"py-spy: no stack within {PYSPY_TIMEOUT:g} s" if proc is not None else
                               f"py-spy: not reached within {PYSPY_TIMEOUT:g} s ({PYSPY_AT_ONCE} ranks read at once)")
        return
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode("utf-8", "replace")
    if proc.returncode == 0:
        report.stacks, report.stacks_from = text, "py-spy"
    else:
        report.problems.append(f"py-spy: exit {proc.returncode}: {text.strip()[:200]}")


def diagnose(reports: dict[int, RankReport]) -> Diagnosis:
    """Name the laggards and say in one line where each rank is."""
    waiters = {r: rep.waiting() for r, rep in reports.items() if rep.in_collective()}
    # The collective the most advanced waiters are in, per process group.
    front: dict[str, int] = {}
    for g in (g for g in waiters.values() if g is not None):
        front[g.pg] = max(front.get(g.pg, -1), g.enqueued)
    laggards = []
    for r, rep in sorted(reports.items()):
        if not waiters:
            break
        if r not in waiters:
            laggards.append(r)
        elif rep.trace is not None and any(rep.trace.groups[pg].enqueued < seq
                                           for pg, seq in front.items() if pg in rep.trace.groups):
            laggards.append(r)
    by_place: dict[tuple[bool, str], list[int]] = {}
    for r in sorted(reports):  # laggards first, then the others, ranks in one place together
        by_place.setdefault((r not in laggards, _where(reports[r], r in laggards)), []).append(r)
    summary = "; ".join(f"{_ranks(rs)} {place.replace('{s}', 's' if len(rs) == 1 else '')}"
                        for (_, place), rs in sorted(by_place.items(), key=lambda kv: kv[0][0]))
    return Diagnosis(laggards, summary or "no live rank", reports)


def _where(rep: RankReport, laggard: bool) -> str:
    """Where a rank is, as a predicate whose verb ends in ``{s}`` (one rank or several)."""
    g = rep.waiting()
    if g is not None:
        return "wait{s} in " + f"{g.op or 'a collective'} #{g.enqueued}" + (" (behind the others)" if laggard else "")
    frame = flight.innermost_own(rep.frames)
    if frame is None:
        return f"gave no stack ({'; '.join(dict.fromkeys(rep.problems)) or 'none'})"
    if rep.trace is None and flight.in_collective(rep.frames):
        return f"at {frame}, inside a collective"
    return f"at {frame}, outside any collective"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def rank_file(rep: RankReport, attempt: int, why: str) -> str:
    lines = [f"rank {rep.rank} (pid {rep.pid}), attempt {attempt}: {why}",
             f"asked at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}", ""]
    lines += [f"== threads (from {rep.stacks_from}) ==", rep.stacks.rstrip(), ""] if rep.stacks else []
    if rep.trace is not None:
        lines.append("== collectives ==")
        for g in rep.trace.groups.values():
            lines.append(f"process group {g.pg} {g.name!r}: entered #{g.enqueued}, "
                         f"retired #{g.completed}" + (f", waiting in {g.op}" if g.waiting else ""))
        for e in rep.trace.entries[-LAST_COLLECTIVES:]:
            lines.append(f"  #{e.get('collective_seq_id')} pg {e.get('pg_id')} "
                         f"{e.get('profiling_name')} sizes {e.get('input_sizes')} "
                         f"{'retired' if e.get('retired') else 'NOT retired'}")
        lines.append("")
    if rep.problems:
        lines += ["== could not get ==", *rep.problems, ""]
    return "\n".join(lines)


async def write(directory: Path, diagnosis: Diagnosis, attempt: int, why: str) -> str | None:
    """Write one file per rank that told or could have told something under ``directory``;
    None if done, else what went wrong. A rank that serves no channel gets none (the event's
    ``unanswered`` says so): at 1,024 such ranks the files cost a third of a second before the
    teardown, for nothing."""
    def _write() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for rep in diagnosis.reports.values():
            if not rep.empty:
                (directory / f"rank-{rep.rank}.txt").write_text(rank_file(rep, attempt, why))
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await blocking.in_thread(_write, "diagnosis-writer")
    except TimeoutError:
        return f"not written within {WRITE_TIMEOUT:g} s"
    except OSError as exc:
        return f"not written: {exc}"
    return None
