"""Run one job under our daemon or under torchrun, read what it prints, watch exits, clean up.

Both launchers run the same :class:`~bench.workloads.Program`. Every time here is wall-clock
(``time.time()``): the daemon's ISO timestamps, the workers' own ``time`` fields, the bench's
kills and the exits it observes all share that clock on one machine. Exits are observed through
pidfds, as events, for any process (a worker is a grandchild of the bench).

The bench is a child subreaper, so workers orphaned by a killed launcher (torchrun's workers
outlive a SIGKILLed agent) are re-parented to it: cleanup finds every process a run started by
walking the bench's own process tree, kills each by pid and reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from supervisord_ft import envvars, procfs

from .workloads import PYTHON, Job, Program

ROOT = Path(__file__).resolve().parent.parent
KILL_WAIT = 10.0  # seconds a SIGKILLed process may take to be gone
STDERR_TAIL = 2000


class BenchError(Exception):
    """A run did not do what the benchmark needs (it names what was missing and shows stderr)."""


def iso_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


@dataclass(frozen=True)
class Record:
    """One JSON line: a worker's event, or one of our daemon's own (their names do not clash)."""

    event: str
    fields: dict[str, Any]
    arrived: float

    @property
    def time(self) -> float:
        """When it happened: the worker's own clock, else the daemon's timestamp, else arrival."""
        if "time" in self.fields:
            return float(self.fields["time"])
        if "timestamp" in self.fields:
            return iso_time(self.fields["timestamp"])
        return self.arrived


def _json(line: bytes) -> dict[str, Any] | None:
    if not line.startswith(b"{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "event" in obj else None


class Runner(Protocol):
    name: str
    env: dict[str, str]  # added to the launcher's environment

    def argv(self, program: Program, workers: int, max_restarts: int, workdir: Path) -> list[str]: ...

    def parse(self, line: bytes, arrived: float) -> Record | None: ...


@dataclass(frozen=True)
class Ours:
    """supervisord-ft, relaunching at once (backoff 0) and counting restarts over the whole run."""

    grace_period: float = 10.0
    name: str = "ours"
    options: tuple[str, ...] = ()  # more daemon options (OURS_COLD's)

    @property
    def env(self) -> dict[str, str]:
        return {}

    def argv(self, program: Program, workers: int, max_restarts: int, workdir: Path) -> list[str]:
        return [PYTHON, "-m", "supervisord_ft", "run", "--log-format", "json",
                "--run-dir", str(workdir / "run"), "--checkpoint-dir", str(workdir / "ckpt"),
                "--num-workers", str(workers), "--max-restarts", str(max_restarts),
                "--restart-window", "0", "--restart-backoff", "0", "--grace-period", str(self.grace_period),
                *self.options, "--", PYTHON, *program.target, *program.args]

    def parse(self, line: bytes, arrived: float) -> Record | None:
        ev = _json(line)
        if ev is None:
            return None
        if ev["event"] == "worker_output" and "worker_event" in ev:
            # The daemon prefixed the worker's own keys that clash with its fields: undo that.
            fields = {k.removeprefix("worker_"): v for k, v in ev.items() if k not in ("event", "level", "stream")}
            return Record(fields.pop("event"), fields, arrived)
        return Record(ev.pop("event"), ev, arrived)


@dataclass(frozen=True)
class Torchrun:
    """``torch.distributed.run --standalone``: one node, a c10d rendezvous store on a free port.

    ``share_store=False`` sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. By default torchrun keeps one
    TCP store for all restarts and workers reuse it without a per-attempt prefix, so a restarted
    rank can read a dead peer's gloo address and fail with "connectFullMesh ... Connection
    refused" (then wait ``shutdown_timeout`` for its peers, blocked in the rendezvous). A fresh
    store per round avoids that: the tuned configuration.
    """

    monitor_interval: float = 0.1
    share_store: bool = True
    shutdown_timeout: int | None = None  # whole seconds (torchrun parses an int); its default is 30
    label: str = ""
    rendezvous: tuple[str, ...] = ("--standalone",)  # or a multi-node job's --nnodes, --rdzv-* flags

    @property
    def name(self) -> str:
        return self.label or f"torchrun (monitor {self.monitor_interval:g} s)"

    @property
    def env(self) -> dict[str, str]:
        return {} if self.share_store else {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def argv(self, program: Program, workers: int, max_restarts: int, workdir: Path) -> list[str]:
        argv = [PYTHON, "-m", "torch.distributed.run", *self.rendezvous, "--nproc-per-node", str(workers),
                "--max-restarts", str(max_restarts), "--monitor-interval", str(self.monitor_interval)]
        if self.shutdown_timeout is not None:
            argv += ["--shutdown-timeout", str(self.shutdown_timeout)]
        return argv + [*program.target, *program.args]

    def parse(self, line: bytes, arrived: float) -> Record | None:
        obj = _json(line)  # torchrun passes worker stdout through untouched; its own log is on stderr
        return None if obj is None else Record(obj.pop("event"), obj, arrived)


def job_env(extra: dict[str, str]) -> dict[str, str]:
    """The bench's environment minus any launcher variables, with the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SUPERVISORD_FT_", "TORCHELASTIC_", "TORCH_DISABLE_SHARE")) and k not in envvars.ALL}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # torchrun sets it for its workers anyway: the same for both
    return {**env, **extra}


# Without the warm standby ranks and the store hosted before the ranks start (both on by default:
# supervisord_ft/standby.py, storehost.py). Benchmarks of the daemon's own costs use it: a pool would
# import torch beside their torch-free workers, and hold 200 MiB per rank of the scale benchmark.
COLD = ("--no-standby", "--no-store-host")
OURS_COLD = Ours(name="ours cold", options=COLD)
TORCHRUN_DEFAULT = Torchrun(0.1, label="torchrun default")
TORCHRUN_TUNED = Torchrun(0.001, share_store=False, label="torchrun tuned")


def kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def read_events(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.startswith("{")]


async def run_daemon(args: list[str], job: list[str], timeout: float,
                     script: Path = ROOT / "tests" / "jobs" / "ddp_plain.py") -> list[dict[str, Any]]:
    """Run the daemon on ``script job`` in a fresh run dir, to its end (or ``timeout``); its events."""
    d = Path(tempfile.mkdtemp(prefix="sftb-run-"))
    try:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "supervisord_ft", "run", "--log-format", "json", "--checkpoint-dir", str(d / "ck"),
            "--run-dir", str(d / "run"), *args, "--", PYTHON, str(script), *job,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=job_env({}), cwd=ROOT,
            start_new_session=True)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        finally:
            kill_group(proc)
            await proc.wait()
        return read_events(d / "run" / "events.jsonl")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def watch_exit(pid: int) -> asyncio.Future[float]:
    """A future set to the wall-clock time ``pid`` exits; any process, not only a child."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[float] = loop.create_future()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fut.set_result(time.time())  # already gone (and reaped): the best we know
        return fut

    def ready() -> None:
        if not fut.done():
            fut.set_result(time.time())

    def release(_: asyncio.Future[float]) -> None:
        loop.remove_reader(fd)
        os.close(fd)

    loop.add_reader(fd, ready)
    fut.add_done_callback(release)
    return fut


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of ``pid`` itself (children excluded); readable from a zombie too."""
    stat = procfs.stat(pid)
    return None if stat is None else stat.cpu_ticks / procfs.CLK_TCK


def peak_rss_kib(pid: int) -> int | None:
    """None when gone, or a zombie (no memory left to report)."""
    hwm = procfs.status_field(pid, "VmHWM")
    return None if hwm is None else int(hwm.split()[0])


def descendants(root: int) -> list[int]:
    """Every process under ``root``, zombies included, found through the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for stat in procfs.processes():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def live_children(pid: int) -> list[int]:
    """``pid``'s direct children that still run: for both launchers, exactly its workers."""
    return [stat.pid for stat in procfs.children(pid) if not stat.zombie]


@dataclass
class Usage:
    """A launcher's own footprint: CPU seconds (final, read at its exit) and peak RSS (sampled)."""

    cpu_s: float = 0.0
    peak_rss_kib: int = 0


@dataclass
class Launch:
    """One launcher process and everything it starts. ``async with`` it; leaving kills the whole tree.

    With ``capture`` the launcher's stdout is parsed into :attr:`records` as it arrives;
    otherwise it goes to ``stdout`` (a descriptor) or /dev/null (for output floods the bench
    must not slow down).
    """

    runner: Runner
    job: Job
    workers: int
    max_restarts: int = 0
    capture: bool = True
    stdout: int = subprocess.DEVNULL  # where stdout goes when it is not captured
    sample_interval: float = 0.1
    checkpoint_dir: Path | None = None  # shared by the nodes of a multi-node job; else the run's own
    records: list[Record] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    returncode: int | None = None
    exited_at: float | None = None

    async def __aenter__(self) -> Launch:
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.checkpoint_dir = self.checkpoint_dir or self.workdir / "ckpt"
        argv = self.runner.argv(self.job.program(self.checkpoint_dir), self.workers, self.max_restarts, self.workdir)
        self._stderr = open(self.workdir / "stderr.log", "ab")  # append: the child's writes never overlap
        self._changed = asyncio.Event()
        self._eof = not self.capture
        self.started = time.time()
        self.proc = subprocess.Popen(argv, cwd=self.workdir, env=job_env(self.runner.env), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if self.capture else self.stdout,
                                     stderr=self._stderr, start_new_session=True)
        self._exit = watch_exit(self.proc.pid)
        self._tasks = [asyncio.create_task(self._sample())]
        if self.capture:
            self._tasks.append(asyncio.create_task(self._read()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.kill_tree()
        finally:
            for task in self._tasks:
                task.cancel()
            self._stderr.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        reader = asyncio.StreamReader(limit=1 << 24)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.proc.stdout)
        while line := await reader.readline():
            record = self.runner.parse(line, time.time())
            if record is not None:
                self.records.append(record)
                self._changed.set()
        self._eof = True
        self._changed.set()

    async def _sample(self) -> None:
        while not self._exit.done():
            if (cpu := cpu_seconds(self.pid)) is not None:
                self.usage.cpu_s = cpu
            self.usage.peak_rss_kib = max(self.usage.peak_rss_kib, peak_rss_kib(self.pid) or 0)
            await asyncio.sleep(self.sample_interval)

    def stderr_tail(self) -> str:
        """The end of the launcher's stderr (torchrun's log, workers' tracebacks), for error messages."""
        return (self.workdir / "stderr.log").read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace")

    # -- reading what the job prints --------------------------------------------------------
    async def follow(self, until: float) -> AsyncIterator[Record]:
        """Every record from the first, as it arrives, until EOF or the wall-clock time ``until``."""
        i = 0
        while True:
            while i < len(self.records):
                yield self.records[i]
                i += 1
            if self._eof:
                return
            self._changed.clear()
            if (timeout := until - time.time()) <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def wait_for(self, pred: Callable[[Record], bool], timeout: float, what: str) -> Record:
        """The first record matching ``pred``; :class:`BenchError` naming ``what`` if none comes in time."""
        async for record in self.follow(until=time.time() + timeout):
            if pred(record):
                return record
        raise BenchError(f"{self.runner.name}: no {what} within {timeout:g} s\n{self.stderr_tail()}")

    def kill_worker(self, rng: random.Random) -> int:
        """SIGKILL one of the launcher's workers, chosen by ``rng`` (a fault); returns its pid."""
        victims = sorted(live_children(self.pid))
        if not victims:
            raise BenchError(f"{self.runner.name}: no worker alive to kill")
        victim = rng.choice(victims)
        with contextlib.suppress(ProcessLookupError):  # it died by itself in between: a fault all the same
            os.kill(victim, signal.SIGKILL)
        return victim

    def named(self, event: str, **match: Any) -> list[Record]:
        return [r for r in self.records if r.event == event and all(r.fields.get(k) == v for k, v in match.items())]

    # -- exits ------------------------------------------------------------------------------
    async def wait_exit(self, timeout: float) -> int:
        """Wait for the launcher to end by itself; returns its exit code."""
        try:
            await asyncio.wait_for(asyncio.shield(self._exit), timeout)
        except TimeoutError:
            raise BenchError(f"{self.runner.name}: still running after {timeout:g} s\n{self.stderr_tail()}") from None
        return await self._reap()

    async def _reap(self) -> int:
        async with asyncio.timeout(KILL_WAIT):
            self.exited_at = await asyncio.shield(self._exit)
        if (cpu := cpu_seconds(self.pid)) is not None:  # the zombie still holds its final CPU times
            self.usage.cpu_s = cpu
        self.returncode = self.proc.wait(timeout=KILL_WAIT)
        if self.capture and not self._eof:  # the last lines are read before anyone looks at them
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(KILL_WAIT):
                    while not self._eof:
                        self._changed.clear()
                        await self._changed.wait()
        return self.returncode

    async def kill_tree(self) -> None:
        """SIGKILL the launcher and everything under the bench, by pid; reap them all (bounded)."""
        pids = descendants(os.getpid())  # runs are sequential: the bench's tree is this run's
        exits = [watch_exit(p) for p in pids]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if exits:
            await asyncio.wait(exits, timeout=KILL_WAIT)
        for fut in exits:
            fut.cancel()  # a no-op for those that resolved; releases the pidfd of any that did not
        if self.returncode is None:
            await self._reap()
        with contextlib.suppress(ChildProcessError):  # orphans re-parented to the bench
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
