"""Warm standby ranks: a :class:`Launcher` that hands each rank an interpreter that has already
imported torch.

A relaunched rank spends most of its start-up importing torch (45-72% of recovery in
BENCHMARKS.md). The pool keeps one standby interpreter per rank (``python -m supervisord_ft_standby``, the
torch-side half of this protocol, :mod:`supervisord_ft_standby.runner`), started ahead of need with the
environment every rank shares and with the pipes that become the rank's stdout and stderr. On
launch, a standby gets the rank's argv, environment and working directory as one JSON line and
runs the script as a fresh ``python`` would. Where a standby can leave ``SCHED_IDLE`` again
(:func:`procfs.can_leave_idle_priority`), the pool fills at once, at the first launch and after
every hand-out, at that priority: it takes no CPU a starting rank wants. Elsewhere it fills,
and refills, once the launched group has settled: its first step or collective, its ranks
together using less than :data:`SETTLED_CPU` of a core (they wait: on a peer, a store, a
file), or at the latest :data:`SETTLE_AFTER` seconds after the launch. A standby importing torch
at normal priority beside ranks still starting takes the CPU their start-up needs (on 2 cores
it delayed a first step by 3 s).

What a standby imports is ``preload`` and, unless ``preload`` was set or ``learn_preload`` is off,
what the job's ranks imported from the standard library and installed packages, asked of them
through the lists their channels keep (:data:`channel.MODULES`) each time the pool fills: a Lightning or HF job
is warm with no configuration. The learnt modules are dropped, for good, when a standby that
imported them holds more than ``standby_memory`` MiB.

Only ``PYTHON script.py ...`` and ``PYTHON -m module ...`` are served warm, with ``PYTHON`` the
interpreter the first launch named and an environment equal to the standbys' in everything but
:data:`envvars.PER_RANK` (anything read at interpreter start or import time must not change);
anything else, and every rank when no standby is ready, starts cold through
:class:`SubprocessLauncher`.

Each standby has a state machine of its own (:data:`TRANSITIONS`), every change logged as a
``standby_state`` event; standbys are never ranks (no rank events, no hang checks). One that dies
while waiting is replaced; one that dies before it was ever ready, or is not ready within the
ranks' ``startup_timeout`` (killed), disables the pool (it would only do it again: a missing
package, a broken or hanging preload), and everything starts cold from then on.
A standby that does not answer its order within :data:`ACTIVATE_TIMEOUT` (stopped, hung) is
killed and its rank started cold. Standbys die with the daemon (parent-death signal) and are
killed by :meth:`StandbyLauncher.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import blocking, channel, envvars, orphans, procfs
from .helpers import import_root
from .workers import (KILL_TIMEOUT, Started, SubprocessLauncher, WorkerSpec,
                      _die_with_parent, _pipe, _stream, forward_if_caught, signal_group)

ACTIVATE_TIMEOUT = 2.0  # an idle standby answers its order in milliseconds; past this it is hung
SETTLE_AFTER = 10.0  # a group that reports no step is taken as started after this long
SETTLE_LOOK = 0.25  # s between two reads of the launched ranks' CPU time while they start
SETTLED_CPU = 0.2  # of one core, the launched ranks together: below it they wait, not start
READ_TIMEOUT = 1.0  # the ranks' module lists are small files in a local directory
REPLY_LIMIT = 4 << 20  # a ready line names every module the standby holds: ~100 KiB for Lightning


class State(enum.Enum):
    STARTING = "starting"  # spawned, importing the preload list
    IDLE = "idle"  # ready, blocked on its order pipe
    HANDED_OUT = "handed_out"  # now a rank: the pool no longer owns it
    DEAD = "dead"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.IDLE, State.DEAD}),
    State.IDLE: frozenset({State.HANDED_OUT, State.DEAD}),
    State.HANDED_OUT: frozenset(),
    State.DEAD: frozenset(),
}


class StandbyError(Exception):
    """A standby could not be handed its rank; the rank starts cold instead."""


class Standby:
    """One pooled interpreter, its pipes and its state."""

    def __init__(self, proc: asyncio.subprocess.Process, output: tuple[int, int],
                 replies: asyncio.StreamReader, reply_pipe: asyncio.BaseTransport, log: Any) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.output = output  # read ends of stdout and stderr, unread until the hand-out
        self.replies = replies
        self.reply_pipe = reply_pipe
        self.state = State.STARTING
        self.spawned_at = time.monotonic()
        self.exit = asyncio.ensure_future(proc.wait())
        orphans.HELPERS.add(proc.pid)
        self.log = log.bind(standby_pid=proc.pid)
        self.learnt = 0  # how many of the pool's learnt modules it imports (a prefix of them)

    def transition(self, to: State, reason: str, *, planned: bool = False, **fields: Any) -> None:
        """``planned``: a death the daemon chose (the run ended), logged at info, not warning."""
        if to not in TRANSITIONS[self.state]:
            raise AssertionError(f"standby {self.pid}: illegal transition {self.state.value} -> {to.value}")
        before, self.state = self.state, to
        if to is not State.IDLE:  # handed out: a worker now; dead: reaped by its exit wait
            orphans.HELPERS.discard(self.pid)
        (self.log.warning if to is State.DEAD and not planned else self.log.info)(
            "standby_state", **{"from": before.value, "to": to.value}, reason=reason, **fields)
        if to is not State.IDLE:
            self.reply_pipe.close()
        if to is State.DEAD:
            signal_group(self.pid, signal.SIGKILL)
            for fd in self.output:
                os.close(fd)
            self.output = ()
            if self.proc.stdin is not None:
                self.proc.stdin.close()


class StandbyLauncher:
    """A pool of ``size`` standbys in front of a :class:`SubprocessLauncher`."""

    def __init__(self, size: int, preload: Sequence[str], log: Any, ready_timeout: float,
                 learn: bool = False, memory_mib: int = 0, early: bool = False) -> None:
        self.size = size
        self.preload = tuple(preload)
        self.learnt: list[str] = []  # modules the ranks imported beyond ``preload``, in order
        self.imported: set[str] = set()  # what ready standbys hold: a warm rank had it already
        self.learning: str | None = None if learn else "off"  # why nothing more is learnt
        self.memory_mib = memory_mib  # what a standby with the learnt modules may hold
        self._channels: dict[int, str] = {}  # the launched ranks' channel sockets, by pid
        # Standbys start at SCHED_IDLE, at once (``early``), when they can leave it when handed out.
        self.idle_priority = early and procfs.can_leave_idle_priority()
        # A standby is a rank's start-up done ahead: one not ready within the ranks' own
        # ``startup_timeout`` (a preload whose import never returns) is killed.
        self.ready_timeout = ready_timeout
        self.log = log
        self.cold = SubprocessLauncher()
        self.python: str | None = None  # learned from the first Python launch
        self.env: dict[str, str] = {}  # the shared environment standbys are started with
        self.disabled: str | None = None  # why the pool gave up; None while it works
        self.standbys: list[Standby] = []
        self._filler: asyncio.Task[None] | None = None
        self._settler: asyncio.Task[None] | None = None
        self._launched: list[int] = []  # pids of the ranks started since the pool last settled
        self._tasks: set[asyncio.Task[None]] = set()  # one watcher per standby

    # -- Launcher -------------------------------------------------------------------------------
    async def start(self, spec: WorkerSpec) -> Started:
        why_cold = self._why_cold(spec)
        if why_cold is None:
            if (standby := self._take()) is None:
                why_cold = "no standby ready"
            else:
                try:
                    started = await self._hand_out(standby, spec)
                    self._started(started, spec)
                    return started
                except StandbyError as exc:
                    why_cold = str(exc)
                finally:
                    self._refill_later()
        self.log.info("standby_not_used", rank=spec.rank.rank, reason=why_cold)
        started = await self.cold.start(spec)
        self._started(started, spec)
        if self.python is None and self.disabled is None and _is_python(spec.argv):
            self.python, self.env = spec.argv[0], _shared(spec.env)
            self._refill_later()
        return started

    def settled(self) -> None:
        self._refill()

    def _started(self, started: Started, spec: WorkerSpec) -> None:
        self._launched.append(started.pid)
        if path := spec.env.get(envvars.CHANNEL):
            self._channels[started.pid] = path

    async def close(self) -> None:
        for task in (self._settler, self._filler, *self._tasks):
            if task is not None:
                task.cancel()
        live = self._live()
        for s in live:
            s.transition(State.DEAD, "run ended", planned=True)
        if live:
            await asyncio.wait([s.exit for s in live], timeout=KILL_TIMEOUT)

    # -- the pool -------------------------------------------------------------------------------
    def _why_cold(self, spec: WorkerSpec) -> str | None:
        if self.disabled is not None:
            return f"pool disabled: {self.disabled}"
        if not _is_python(spec.argv):
            return "not a `python script.py` or `python -m module` command"
        if self.python is None:
            return "first launch: the pool starts now"
        if spec.argv[0] != self.python:
            return f"another interpreter than the standbys' ({self.python})"
        if (changed := sorted(k for k in self.env.keys() ^ _shared(spec.env).keys()) or
                sorted(k for k in self.env if self.env[k] != spec.env.get(k))):
            return f"environment differs from the standbys' in {', '.join(changed[:5])}"
        return None

    def _take(self) -> Standby | None:
        """An idle standby, one that imports the most of what was learnt first."""
        return max((s for s in self.standbys if s.state is State.IDLE), key=lambda s: s.learnt,
                   default=None)

    def _refill_later(self) -> None:
        """Refill once the group settles: at :meth:`settled`, when the ranks started stop using
        the CPU, at the latest after SETTLE_AFTER; at idle priority, at once too (the settled
        group's imports are learnt then)."""
        if self.idle_priority:
            self._refill()
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle(), name="standby-settle")
            self._track(self._settler)

    async def _settle(self) -> None:
        """Refill once the launched ranks' CPU time grows by less than SETTLED_CPU of a core
        between two reads (a rank's interpreter start and imports keep a core busy)."""
        loop = asyncio.get_running_loop()
        deadline, before = loop.time() + SETTLE_AFTER, self._cpu_ticks()
        while loop.time() < deadline:
            await asyncio.sleep(SETTLE_LOOK)
            now = self._cpu_ticks()
            if now - before < SETTLED_CPU * SETTLE_LOOK * procfs.CLK_TCK:
                break
            before = now
        self._launched.clear()
        self._refill()

    def _cpu_ticks(self) -> int:
        """The CPU time of the ranks started since the pool last settled that still live."""
        stats = [st for pid in self._launched if (st := procfs.stat(pid)) is not None and not st.zombie]
        self._launched = [st.pid for st in stats]
        return sum(st.cpu_ticks for st in stats)

    def _refill(self) -> None:
        """Start standbys in the background until ``size`` are starting or idle."""
        if self.python is None:  # no Python rank launched yet: nothing to start standbys for
            return
        if self.disabled is None and (self._filler is None or self._filler.done()):
            self._filler = asyncio.create_task(self._fill(), name="standby-fill")
            self._track(self._filler)

    async def _fill(self) -> None:
        """Start standbys until ``size`` import all that was learnt; older ones are retired as
        the new ones get ready (:meth:`_trim`)."""
        if self.learning is None:
            await self._learn()
        while self.disabled is None and len(self._current()) < self.size:
            try:
                standby = await self._spawn()
            except OSError as exc:
                self._disable(f"cannot start `{self.python} -m supervisord_ft_standby`: {exc}")
                return
            self.standbys.append(standby)
            self._track(asyncio.create_task(self._watch(standby), name=f"standby-{standby.pid}"))

    async def _learn(self) -> None:
        """Add what the live ranks imported beyond what is known to :attr:`learnt`."""
        self._channels = {pid: path for pid, path in self._channels.items() if procfs.alive(pid)}
        paths = [path + channel.MODULES for path in self._channels.values()]
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                lists = await blocking.in_thread(lambda: [_read_list(p) for p in paths], "standby-learn")
        except TimeoutError:
            return
        known, new = {*self.preload, *self.learnt, *self.imported}, []
        for names in lists:
            for name in names:
                if isinstance(name, str) and name not in known and _module_name(name):
                    known.add(name)
                    new.append(name)
        if new:
            self.learnt += new
            self.log.info("preload_learnt", modules=len(new), total=len(self.learnt),
                          packages=sorted({top for n in new if not (top := n.split(".")[0])
                                           .startswith("_") and top not in sys.stdlib_module_names}))

    def _over_budget(self, s: Standby, rss_mib: int) -> None:
        """``s`` imported the learnt modules and holds more than ``standby_memory``: they are
        dropped (said once), and ``s`` is replaced by a standby without them."""
        if self.learnt:
            why = f"a standby that imported them holds {rss_mib} MiB (standby_memory: {self.memory_mib})"
            self.log.warning("preload_learnt_dropped", modules=len(self.learnt), reason=why)
            self.learnt, self.learning = [], why
        s.transition(State.DEAD, "over standby_memory: replaced", planned=True)
        self._refill()

    def _live(self) -> list[Standby]:
        return [s for s in self.standbys if s.state in (State.STARTING, State.IDLE)]

    def _current(self) -> list[Standby]:
        return [s for s in self._live() if s.learnt == len(self.learnt)]

    def _trim(self) -> None:
        """Beyond ``size`` ready standbys, retire those that import less than was learnt."""
        idle = [s for s in self.standbys if s.state is State.IDLE]
        stale = sorted((s for s in idle if s.learnt != len(self.learnt)), key=lambda s: s.learnt)
        for s in stale[:max(0, len(idle) - self.size)]:
            s.transition(State.DEAD, "retired: a standby with what was learnt since is ready",
                         planned=True)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        """A watcher, the filler or the settler ended; one that failed (a bug) is said, and the
        pool stops: ranks start cold."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._disable(f"{task.get_name()} failed: {type(exc).__name__}: {exc}")

    def _disable(self, reason: str) -> None:
        if self.disabled is not None:
            return
        self.disabled = reason
        self.log.error("standby_disabled", reason=reason)

    async def _spawn(self) -> Standby:
        assert self.python is not None
        out, err, (reply_r, reply_w) = _pipe(), _pipe(), os.pipe2(os.O_CLOEXEC)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "supervisord_ft_standby", str(reply_w), *self.preload,
                stdin=asyncio.subprocess.PIPE, stdout=out[1], stderr=err[1], pass_fds=(reply_w,),
                env=self.env, cwd=import_root(), start_new_session=True,
                preexec_fn=functools.partial(_in_standby, os.getpid(), self.idle_priority))
        except BaseException:
            for fd in (out[0], err[0], reply_r):
                os.close(fd)
            raise
        finally:
            for fd in (out[1], err[1], reply_w):  # the child holds its copies
                os.close(fd)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"learnt": self.learnt}).encode() + b"\n")
        replies, pipe = await _stream(reply_r, REPLY_LIMIT)
        standby = Standby(proc, (out[0], err[0]), replies, pipe, self.log)
        standby.learnt = len(self.learnt)
        standby.log.info("standby_state", **{"from": None, "to": State.STARTING.value},
                         reason="refill", preload=list(self.preload), learnt=len(self.learnt))
        return standby

    async def _watch(self, s: Standby) -> None:
        """Until ``s`` is handed out: its ready line, then its death while idle, if it comes."""
        line: bytes | None
        try:
            async with asyncio.timeout(self.ready_timeout or None):
                line = await s.replies.readline()
        except TimeoutError:
            line = None
        if s.state is not State.STARTING:  # the run ended meanwhile
            return
        try:
            ready = json.loads(line) if line and line.startswith(b"{") else {}
        except ValueError:
            ready = {}
        if not isinstance(ready, dict) or ready.get("event") != "ready":
            reason = await self._unready(s, line)
            s.transition(State.DEAD, reason)
            self._disable(f"a standby {reason}: every rank starts cold")
            return
        if ready["failed"]:
            s.log.warning("standby_preload_failed", modules=ready["failed"])
        self.imported.update(m for m in ready.get("modules", ()) if isinstance(m, str))
        rss_mib = int((procfs.status_field(s.pid, "VmRSS") or "0 kB").split()[0]) >> 10
        if s.learnt and rss_mib > self.memory_mib:
            self._over_budget(s, rss_mib)
            return
        s.transition(State.IDLE, "ready", seconds=round(time.monotonic() - s.spawned_at, 3),
                     rss_mib=rss_mib, skipped=len(ready.get("skipped", ())))
        self._trim()
        rc = await s.exit
        if s.state is State.IDLE:
            s.transition(State.DEAD, f"exited with {rc} while idle: replaced")
            self._refill()

    async def _unready(self, s: Standby, line: bytes | None) -> str:
        """Why ``s`` never became ready; one still alive is killed (bounded by KILL_TIMEOUT)."""
        if line is None:
            why = f"was not ready within {self.ready_timeout:g} s (startup_timeout): killed"
        elif line:
            why = f"answered {line[:200]!r} instead of being ready: killed"
        else:
            why = None
        if why is None or not s.exit.done():
            if why is None:  # its reply pipe closed: it is exiting, or closed it and lives on
                try:
                    rc = await asyncio.wait_for(asyncio.shield(s.exit), KILL_TIMEOUT)
                    return f"exited with {rc} before it was ready"
                except TimeoutError:
                    why = "closed its reply pipe before it was ready: killed"
            signal_group(s.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(s.exit), KILL_TIMEOUT)
        return why

    async def _hand_out(self, standby: Standby, spec: WorkerSpec) -> Started:
        order = {"argv": list(spec.argv), "env": dict(spec.env), "cwd": _cwd(),
                 "nice": os.getpriority(os.PRIO_PROCESS, 0) if self.idle_priority else None}
        assert standby.proc.stdin is not None
        try:
            standby.proc.stdin.write(json.dumps(order).encode() + b"\n")
            async with asyncio.timeout(ACTIVATE_TIMEOUT):
                await standby.proc.stdin.drain()
                reply = await standby.replies.readline()
        except (TimeoutError, OSError) as exc:
            reason = f"no answer to its order within {ACTIVATE_TIMEOUT:g} s" \
                if isinstance(exc, TimeoutError) else f"order not delivered: {exc}"
            standby.transition(State.DEAD, reason)
            raise StandbyError(f"standby {standby.pid}: {reason}") from None
        answer = json.loads(reply) if reply else {"event": "exited"}
        if answer.get("event") != "running":
            standby.transition(State.DEAD, f"answered {answer}")
            raise StandbyError(f"standby {standby.pid} answered {answer}")
        standby.proc.stdin.close()
        standby.transition(State.HANDED_OUT, "activated", rank=spec.rank.rank)
        output, standby.output = standby.output, ()
        pid = standby.pid
        return Started(pid, standby.proc.wait, functools.partial(signal_group, pid),
                       functools.partial(forward_if_caught, pid), output)


def _in_standby(parent_pid: int, idle_priority: bool) -> None:
    """Runs in a standby between fork and exec. At SCHED_IDLE it imports with CPU time no rank
    wants, so the pool can fill beside ranks that are still starting; its runner goes back to
    the daemon's scheduling when it is handed a rank."""
    _die_with_parent(parent_pid)
    if idle_priority:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _cwd() -> str:
    """Where a cold rank would start: the daemon's working directory. Deleted under the running
    job (a scratch dir cleaned), it has no path, but a cold rank still starts in it; a standby
    gets there through ``/proc/<daemon>/cwd``, which leads to a deleted directory too."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return f"/proc/{os.getpid()}/cwd"


def _is_python(argv: Sequence[str]) -> bool:
    """``X script.py ...`` or ``X -m module ...`` where X is named like a Python interpreter."""
    if len(argv) < 2 or not Path(argv[0]).name.startswith("python"):
        return False
    return (argv[1] == "-m" and len(argv) >= 3) or not argv[1].startswith("-")


def _read_list(path: str) -> list[Any]:
    """A rank's module list; empty while it has none (not written yet, not a Python rank)."""
    try:
        with open(path, "rb") as fh:
            names = json.load(fh)
    except (OSError, ValueError):
        return []
    return names if isinstance(names, list) else []


def _module_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _shared(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in envvars.PER_RANK}
