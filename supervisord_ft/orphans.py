"""Processes the workers started that outlive them: found, killed and reaped, never left behind.

Two ways out of a worker's process group, and where each is caught:

- **A process that left the group** (``setsid``, a double fork). The daemon is a child
  subreaper, so when its parent dies the kernel re-parents it to the daemon instead of init:
  after every teardown and at the end of the run, :func:`sweep` kills every child of the daemon
  that is not a live worker, with its process group, and reaps it. Only children in another
  session than the daemon's are taken: workers start sessions of their own and nothing under
  them can join the daemon's, so a process that embeds a :class:`Supervisor` (a test) keeps
  its other children. The event loop reaps only the
  pids it spawned; anything else re-parented to us would stay a zombie, so reaping those is ours
  (``waitpid`` on their pids only: ``waitpid(-1)`` would steal the workers' exit statuses).
- **A daemon SIGKILL.** Workers die of the parent-death signal, their own children do not. The
  process groups of each launch are recorded in ``<run_dir>/workers.json``; the next daemon on
  that run dir kills what is left of them (:func:`find_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import itertools
import signal
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import blocking, procfs
from .checkpoints import atomic_write
from .logs import EVENTS_FILE
from .workers import KILL_TIMEOUT, Worker

_PR_SET_CHILD_SUBREAPER = 36
RECORD_NAME = "workers.json"


def become_subreaper() -> None:
    """Descendants orphaned from now on are re-parented to this process (Linux ≥ 3.4).

    Process-wide, so the daemon's entry point calls it, not the loop.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


async def _exits(pidfds: dict[int, int], timeout: float) -> set[int]:
    """The pids among ``pidfds`` that exit within ``timeout``."""
    loop = asyncio.get_running_loop()
    waits: dict[asyncio.Future[None], int] = {}
    for pid, fd in pidfds.items():
        fut: asyncio.Future[None] = loop.create_future()
        # A pidfd becomes readable when its process exits (is a zombie or gone).
        loop.add_reader(fd, lambda f=fut: f.done() or f.set_result(None))
        waits[fut] = pid
    try:
        if waits:
            await asyncio.wait(waits, timeout=max(timeout, 0))
    finally:
        for fd in pidfds.values():
            loop.remove_reader(fd)
    return {pid for fut, pid in waits.items() if fut.done()}


def _kill_groups(groups: Iterable[int]) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


# The daemon's own helpers (standby interpreters, the store host): children in sessions of their
# own that are no orphans. Their owners add and discard them.
HELPERS: set[int] = set()


def _orphans(procs: Iterable[procfs.Stat], keep: Collection[int]) -> dict[int, procfs.Stat]:
    """Children of ours that a worker left: in another session, not a live worker nor a helper
    (one just started is not in HELPERS yet: its command line says what it is)."""
    me, session = os.getpid(), os.getsid(0)
    return {p.pid: p for p in procs if p.ppid == me and p.sid != session and p.pid not in keep
            and p.pid not in HELPERS and not _helper_starting(p.pid)}


def _helper_starting(pid: int) -> bool:
    """``python -m supervisord_ft_standby[.name]``, or a fork of ours not yet exec'd: a helper
    the pool or the store host started and registers once its spawn returns (a sweep running
    meanwhile killed it, and the pool was disabled: 'standby-fill failed')."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        with open("/proc/self/cmdline", "rb") as fh:
            ours = fh.read()
    except OSError:
        return False
    argv = cmdline.split(b"\0")
    return cmdline == ours or any(  # not yet exec'd (its command line is still ours), or it is
        a == b"supervisord_ft_standby" or a.startswith(b"supervisord_ft_standby.") for a in argv[1:3])


# -- at every teardown and at the end ----------------------------------------------------------
@dataclass
class Sweep:
    killed: list[int] = field(default_factory=list)  # found alive, SIGKILLed
    stuck: list[int] = field(default_factory=list)   # alive KILL_TIMEOUT after SIGKILL


async def sweep(workers: Collection[Worker], log: Any) -> Sweep:
    """Kill what ``workers`` left running: their process groups, then every other child of ours.

    Killing an orphan can orphan its own children, which the kernel then hands to us: repeat
    until no child but a live worker is left, within ``KILL_TIMEOUT``. Logs ``orphans_killed``
    (warning) with the pids found alive, and ``orphans_stuck`` (error) for any that outlived it.
    """
    keep = {w.pid for w in workers if w.alive}  # not yet reaped by the event loop: not ours to reap
    exited_workers = [w for w in workers if not w.alive]
    groups = {w.pid for w in exited_workers}  # a worker's pgid is its pid
    done = Sweep()
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        procs = list(procfs.processes())
        orphans = _orphans(procs, keep)
        groups |= {p.pgid for p in orphans.values() if not p.zombie}
        done.killed += [p.pid for p in procs if not p.zombie and p.pid not in keep
                        and (p.pgid in groups or p.pid in orphans)]
        fds = {}
        for pid in orphans:  # unreaped children: their pids cannot be reused before we reap them
            with contextlib.suppress(ProcessLookupError):
                fds[pid] = os.pidfd_open(pid)
        try:
            for w in exited_workers:  # through the launcher, which knows what its processes are
                w.signal_group(signal.SIGKILL)
            exited_workers = []
            _kill_groups({p.pgid for p in orphans.values() if not p.zombie})
            for fd in fds.values():
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            exited = await _exits(fds, deadline - time.monotonic())
            for pid in exited:
                with contextlib.suppress(ChildProcessError):  # reap() got there first
                    os.waitid(os.P_PIDFD, fds[pid], os.WEXITED | os.WNOHANG)
        finally:
            for fd in fds.values():
                os.close(fd)
        if exited != set(fds) or time.monotonic() >= deadline:
            done.stuck = sorted(set(fds) - exited)
            break
        if not orphans:
            break
    done.killed = sorted(set(done.killed))
    if done.killed:
        log.warning("orphans_killed", pids=done.killed,
                    reason="left running by workers (their process groups or re-parented to us)")
    if done.stuck:
        log.error("orphans_stuck", pids=done.stuck, reason="still alive after SIGKILL")
    return done


def reap(workers: Collection[Worker]) -> list[int]:
    """Reap orphans re-parented to us that exited on their own; cheap enough for every tick."""
    reaped = [pid for pid, p in _orphans(procfs.processes(), {w.pid for w in workers if w.alive}).items()
              if p.zombie]
    for pid in reaped:
        with contextlib.suppress(ChildProcessError):  # a sweep got there first
            os.waitpid(pid, os.WNOHANG)
    return reaped


# -- after a daemon SIGKILL --------------------------------------------------------------------
RECORD_WAIT = 1.0  # the record is a few bytes: past this the run dir's file system is stalled
_record_lock = threading.Lock()
_recorded = [0]  # the generation of the newest record written
_generations = itertools.count(1)
_writes: set[asyncio.Task[None]] = set()


def record(run_dir: Path, workers: Collection[Worker], log: Any) -> None:
    """Record this launch's process groups (each worker leads its own) for a successor.

    Written off the loop, so a stalled run dir never holds a launch; a write that fails or takes
    longer than RECORD_WAIT is said, and an older record never replaces a newer one."""
    me = procfs.stat()
    assert me is not None  # our own process
    data = json.dumps({"daemon": {"pid": me.pid, "start_ticks": me.start_ticks},
                       "groups": sorted(w.pid for w in workers)}).encode()
    task = asyncio.ensure_future(_record(run_dir / RECORD_NAME, data, next(_generations), log))
    _writes.add(task)
    task.add_done_callback(_writes.discard)


async def _record(path: Path, data: bytes, generation: int, log: Any) -> None:
    def write() -> None:
        with _record_lock:
            if generation > _recorded[0]:
                atomic_write(path, lambda fh: fh.write(data))
                _recorded[0] = generation
    try:
        async with asyncio.timeout(RECORD_WAIT):
            await blocking.in_thread(write, "workers-record")
    except (OSError, TimeoutError) as exc:  # supervision goes on; only a SIGKILL's leftovers would be missed
        log.warning("workers_record_failed", path=str(path),
                    reason=str(exc) or f"not written within {RECORD_WAIT:g} s")


async def forget(run_dir: Path) -> None:
    """The run ended and nothing is left: there is nothing for a successor to clean up."""
    def remove() -> None:
        with _record_lock:
            _recorded[0] = next(_generations)  # a record still being written stays unwritten
            (run_dir / RECORD_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(RECORD_WAIT):
            await blocking.in_thread(remove, "workers-record")


@dataclass
class Leftovers:
    """Live processes of a dead predecessor's recorded process groups."""

    run_dir: Path
    groups: dict[int, list[procfs.Stat]] = field(default_factory=dict)  # pgid -> live members

    async def kill(self, log: Any) -> None:
        """SIGKILL them, wait (bounded) until they are gone, log ``leftovers_killed``."""
        fds = {}
        for members in self.groups.values():
            for m in members:
                with contextlib.suppress(ProcessLookupError):
                    fd = os.pidfd_open(m.pid)
                    now = procfs.stat(m.pid)  # the pid still names the process we found?
                    if now is not None and now.start_ticks == m.start_ticks:
                        fds[m.pid] = fd
                    else:
                        os.close(fd)
        _kill_groups(self.groups)
        try:
            exited = await _exits(fds, KILL_TIMEOUT)
        finally:
            for fd in fds.values():
                os.close(fd)
        if self.groups:
            log.warning("leftovers_killed", pids=sorted(fds), groups=sorted(self.groups),
                        reason=f"left by a daemon killed before it could stop them ({RECORD_NAME})")
        if stuck := sorted(set(fds) - exited):
            log.error("orphans_stuck", pids=stuck, reason="still alive after SIGKILL")
        await forget(self.run_dir)


def find_leftovers(run_dir: Path) -> Leftovers:
    """What a dead predecessor on ``run_dir`` left alive. Call before writing to ``run_dir``.

    A recorded group may be long gone and its id reused, so a group is taken only with proof:
    one of its members (zombies count) started before the predecessor's last write to the run
    dir. The kernel never reuses a group id while the group has members; a reused id belongs
    to a group created after the old one emptied, hence after the predecessor last wrote (its
    workers outlive its last write), whose members all started later still. So a member that
    started earlier proves the group never emptied, and every member of it is the predecessor's.
    """
    found = Leftovers(run_dir)
    try:
        data = json.loads((run_dir / RECORD_NAME).read_bytes())
        daemon, groups = data["daemon"], {int(g) for g in data["groups"]}
        predecessor = procfs.stat(int(daemon["pid"]))
        if predecessor is not None and predecessor.start_ticks == int(daemon["start_ticks"]):
            return found  # alive: its workers are its own business
    except (OSError, ValueError, KeyError, TypeError):
        return found  # no record (the usual case: the last run ended cleanly) or not ours
    cutoff = _last_write_ticks(run_dir)
    members: dict[int, list[procfs.Stat]] = {}
    for p in procfs.processes():
        if p.pgid in groups:
            members.setdefault(p.pgid, []).append(p)
    for pgid, group in members.items():
        live = [p for p in group if not p.zombie]
        if live and any(p.start_ticks < cutoff for p in group):
            found.groups[pgid] = live
    return found


def _last_write_ticks(run_dir: Path) -> int:
    """The newest mtime among the run dir's files, on the clock of /proc start times."""
    newest = 0.0
    for name in (EVENTS_FILE, RECORD_NAME):
        with contextlib.suppress(OSError):
            newest = max(newest, (run_dir / name).stat().st_mtime)
    boot_offset = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return int((newest - boot_offset) * procfs.CLK_TCK)
