"""Worker processes: spawn them, await their exits, stop them within a bound.

Each worker runs in its own process session (so a signal to its process group reaches anything
it forked, and a Ctrl+C on the daemon's terminal does not reach it directly) and gets the Linux
parent-death signal, so a SIGKILLed daemon never leaves a worker behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import channel, procfs
from .output import OutputRouter, Pipe, Source
from .rendezvous import RankInfo

_PR_SET_PDEATHSIG = 1
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size
_libc = ctypes.CDLL(None, use_errno=True)
# After a worker exits, what it wrote is read at once, whoever else holds its pipes; only a
# grandchild that inherited them and keeps them full could make that wait, so it is bounded.
PIPE_DRAIN_TIMEOUT = 1.0
# After SIGKILL a process dies unless stuck in uninterruptible I/O; past this we report it.
KILL_TIMEOUT = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start one rank."""

    rank: RankInfo
    argv: tuple[str, ...]
    env: Mapping[str, str]


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the daemon died before prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class Started:
    """A rank as its launcher hands it over: a process, its two output pipes, and its controls."""

    pid: int
    wait: Callable[[], Awaitable[int]]  # the exit status (negative: killed by that signal)
    signal_group: Callable[[int], bool]  # signal its process group; False when nothing is left
    # Deliver a signal to the rank's own process only if it has a handler for it (the signals
    # forwarded this way terminate by default); False when it has none or is gone.
    forward: Callable[[int], bool]
    output: tuple[int, int]  # read ends of its stdout and stderr, the receiver's to close


class Launcher(Protocol):
    """Starts ranks and owns whatever it needs to (a pool of warm interpreters, one day).

    ``start`` hands out one process per spec; ``settled`` says the group it started has made
    its first step (its start-up no longer needs the CPU); ``close`` releases what the launcher
    holds when the run ends. The loop never assumes a process was created by fork/exec.
    """

    async def start(self, spec: WorkerSpec) -> Started: ...

    def settled(self) -> None: ...

    async def close(self) -> None: ...


class SubprocessLauncher:
    """A fresh process per rank, its stdout and stderr on pipes enlarged to ``PIPE_SIZE``.

    A bigger pipe gives the daemon slack: a worker printing 200k lines/s fills the default
    64 KiB in about 10 ms, so a short scheduling gap in the daemon would block it.
    """

    def settled(self) -> None:
        """Nothing to do: every rank is started afresh."""

    async def start(self, spec: WorkerSpec) -> Started:
        pipes = [_pipe(), _pipe()]
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=pipes[0][1],
                stderr=pipes[1][1],
                env=channel.cold_env(spec.env),
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        except BaseException:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        for _, w in pipes:
            os.close(w)  # the child holds its copy
        return Started(proc.pid, proc.wait, functools.partial(signal_group, proc.pid),
                       functools.partial(forward_if_caught, proc.pid), (pipes[0][0], pipes[1][0]))

    async def close(self) -> None:
        """Nothing is held between launches."""


def forward_if_caught(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` if the kernel lists a handler for it there (``SigCgt``)."""
    if sig not in (procfs.caught_signals(pid) or ()):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when nothing is left to signal."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(r, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default size still works
    return r, w


async def _stream(fd: int, limit: int = 1 << 16) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """``fd`` as a stream of lines of at most ``limit`` bytes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", 0))
    return reader, transport


class Worker:
    """One running rank. ``exit`` completes with the return code once its output is read."""

    def __init__(self, spec: WorkerSpec, started: Started, pipes: Sequence[Pipe]) -> None:
        self.spec = spec
        self.pid = started.pid
        self.started = time.monotonic()
        self.exited_at: float | None = None  # when its exit was noticed
        self._process = started
        self._pipes = list(pipes)
        self.exit: asyncio.Task[int] = asyncio.create_task(self._wait(), name=f"exit-{self.rank}")

    @property
    def rank(self) -> int:
        return self.spec.rank.rank

    @property
    def alive(self) -> bool:
        return not self.exit.done()

    async def _wait(self) -> int:
        rc = await self._process.wait()
        self.exited_at = time.monotonic()
        for pipe in self._pipes:
            pipe.writer_exited()
        try:
            async with asyncio.timeout(PIPE_DRAIN_TIMEOUT):
                for pipe in self._pipes:
                    await pipe.read_out.wait()
        except TimeoutError:
            pass
        finally:
            for pipe in self._pipes:  # a grandchild may hold them open: closing is ours to do
                pipe.close()
        return rc

    def signal_group(self, sig: int) -> bool:
        """Signal the worker's process group; False when nothing is left to signal."""
        return self._process.signal_group(sig)

    def forward(self, sig: int) -> bool:
        """Send ``sig`` to the rank's own process if it handles it; False if it does not."""
        return self.alive and self._process.forward(sig)


async def spawn(spec: WorkerSpec, attempt: int, launcher: Launcher, router: OutputRouter,
                log: Any) -> Worker:
    started = await launcher.start(spec)
    pipes: list[Pipe] = []
    try:
        for stream, fd in zip(("stdout", "stderr"), started.output):
            pipes.append(await router.connect(Source(spec.rank.rank, attempt, stream, log), fd))
    except BaseException:
        for fd in started.output[len(pipes) + 1:]:  # connect closed the one it failed on
            os.close(fd)
        raise
    return Worker(spec, started, pipes)


async def wait_exits(workers: Sequence[Worker], timeout: float, cut_short: asyncio.Event,
                     until: Callable[[Worker], bool] | None = None) -> None:
    """Wait until every one of ``workers`` has exited, ``timeout`` has passed, ``cut_short`` is
    set, or one that exits makes ``until`` true."""
    by_exit = {w.exit: w for w in workers if w.alive}
    pending = set(by_exit)
    cut = asyncio.create_task(cut_short.wait())
    try:
        async with asyncio.timeout(timeout):
            while pending and not cut.done():
                done, pending = await asyncio.wait(pending | {cut}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(cut)
                if until is not None and any(until(by_exit[t]) for t in done if t in by_exit):
                    return
    except TimeoutError:
        pass
    finally:
        cut.cancel()


@dataclass(frozen=True)
class StopReport:
    seconds: float
    terminated: list[int]  # ranks that exited within the grace period after SIGTERM
    killed: list[int]      # ranks that needed SIGKILL
    stuck: list[int]       # ranks still alive KILL_TIMEOUT after SIGKILL (uninterruptible)


async def stop(workers: Sequence[Worker], grace: float, kill_now: asyncio.Event) -> StopReport:
    """SIGTERM every live worker's group, wait ``grace`` (or until ``kill_now``), SIGKILL the rest.

    Bounded by ``grace + KILL_TIMEOUT``. Every group ends with a SIGKILL so that processes a
    worker forked do not outlive it.
    """
    t0 = time.monotonic()
    live = [w for w in workers if w.alive]
    for w in live:
        w.signal_group(signal.SIGTERM)
    await wait_exits(live, grace, kill_now)
    terminated = [w.rank for w in live if not w.alive]
    killed = [w.rank for w in live if w.alive]
    # Every group of this attempt, exited leaders included: what they forked may live on. The
    # kernel does not reuse a process-group id while the group has members, so a group with
    # members is still ours; an empty one just answers ESRCH.
    for w in workers:
        w.signal_group(signal.SIGKILL)
    remaining = {w.exit for w in live if w.alive}
    if remaining:
        await asyncio.wait(remaining, timeout=KILL_TIMEOUT)
    stuck = [w.rank for w in live if w.alive]
    return StopReport(time.monotonic() - t0, terminated, killed, stuck)
