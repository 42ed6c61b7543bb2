"""Runs the real daemon as a subprocess and reads its JSON events: shared by every test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from supervisord_ft.procfs import alive as pid_alive

ROOT = Path(__file__).resolve().parent.parent
FAKE_WORKER = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]
# The defaults turned off: no standby pool, rank 0 hosts the store.
COLD = ("--no-standby", "--no-store-host")
Event = dict[str, Any]



def strict_json(line: str | bytes) -> Any:
    """RFC 8259: ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (``json.loads`` takes them)."""
    def refuse(token: str) -> Any:
        raise ValueError(f"not strict JSON: {token} in {line[:200]!r}")
    return json.loads(line, parse_constant=refuse)


def matching(events: list[Event], name: str, **match: Any) -> list[Event]:
    """The events called ``name`` whose fields have the values ``match`` gives."""
    return [e for e in events if e["event"] == name
            and all(e.get(k) == v for k, v in match.items())]


def read_events(path: Path) -> list[Event]:
    """Every complete line of an events file, each parsed as strict JSON."""
    if not path.exists():
        return []
    text = path.read_text()
    return [strict_json(line) for line in text[:text.rfind("\n") + 1].splitlines()]


class MemoryStdout:
    """A stdout for in-process logging tests: keeps every line it is given."""

    gone = None

    def __init__(self) -> None:
        self.lines: list[str] = []

    def isatty(self) -> bool:
        return False

    def write(self, line: str) -> bool:
        self.lines.append(line)
        return True

    def close(self) -> int:
        return 0

    def events(self) -> list[Event]:
        return [json.loads(line) for line in self.lines]


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``supervisord-ft ARGS`` (e.g. ``status``, ``report``) to its end: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisord_ft", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()


class Daemon:
    """One supervisord-ft process. Its stdout (JSON events) is read as it is written."""

    def __init__(self, proc: asyncio.subprocess.Process, workdir: Path) -> None:
        self.proc = proc
        self.workdir = workdir
        self.events: list[Event] = []
        self.stderr = ""

    @classmethod
    async def start(cls, workdir: Path, *args: str, command: list[str] | None = None,
                    stdout: int = asyncio.subprocess.PIPE, redirect: str = "",
                    env: dict[str, str] | None = None, wrap: list[str] | None = None,
                    program: list[str] | None = None) -> "Daemon":
        """``stdout``: a descriptor instead of the pipe these methods read; ``redirect``: shell
        redirections applied to the daemon (e.g. ``>&-`` to start it with stdout closed);
        ``wrap``: a prefix that execs the daemon (``ip netns exec NS``);
        ``env``: variables added to the daemon's environment; ``program``: the daemon's command
        instead of ``supervisord-ft run`` (``torchrun-ft``)."""
        argv = [*(program or [sys.executable, "-m", "supervisord_ft", "run"]), "--log-format", "json",
                "--checkpoint-dir", str(workdir / "ckpt"), "--run-dir", str(workdir / "run")]
        if command:  # a script's ranks start cold unless the test says otherwise: a pool and a
            argv += COLD  # store host would import torch beside a torch-free fake worker
        argv += args
        if command:
            argv += ["--", *command]
        if redirect:
            argv = ["bash", "-c", f'exec "$@" {redirect}', "bash", *argv]
        argv = [*(wrap or []), *argv]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout, stderr=asyncio.subprocess.PIPE, limit=1 << 24)
        return cls(proc, workdir)

    @property
    def events_file(self) -> Path:
        return self.workdir / "run" / "events.jsonl"

    async def _next(self) -> Event | None:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            return None
        event = json.loads(line)
        self.events.append(event)
        return event

    async def wait_for(self, pred: Callable[[Event], bool], timeout: float = 60) -> Event:
        """Read events until one matches ``pred``; fail if the daemon ends first."""
        for event in self.events:
            if pred(event):
                return event
        async with asyncio.timeout(timeout):
            while (event := await self._next()) is not None:
                if pred(event):
                    return event
        raise AssertionError(f"daemon ended without the awaited event; last: {self.events[-3:]}")

    async def finish(self, timeout: float = 60) -> int:
        """Read every remaining event and return the exit code."""
        async with asyncio.timeout(timeout):
            while self.proc.stdout is not None and await self._next() is not None:
                pass
            assert self.proc.stderr is not None
            self.stderr = (await self.proc.stderr.read()).decode()
            return await self.proc.wait()

    async def follow(self, pred: Callable[[Event], bool], timeout: float = 30) -> Event:
        """The first event of events.jsonl that matches ``pred``, for a daemon whose stdout is
        not ours to read. It polls: a file's growth is no event that the stdlib can await."""
        offset, partial = 0, b""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        with open(self.events_file, "rb") as fh:
                            fh.seek(offset)
                            chunk = fh.read()
                    except FileNotFoundError:
                        chunk = b""
                    offset += len(chunk)
                    *lines, partial = (partial + chunk).split(b"\n")
                    for line in lines:
                        if pred(event := strict_json(line)):
                            return event
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"no awaited event in {self.events_file} within {timeout} s "
                                 f"(read {offset} bytes)") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def named(self, name: str, **match: Any) -> list[Event]:
        return matching(self.events, name, **match)

    def states(self) -> list[str]:
        changes = self.named("state_changed")
        return [changes[0]["from"], *(e["to"] for e in changes)] if changes else []

    def worker_pids(self) -> list[int]:
        return [e["pid"] for e in self.named("worker_started")]

    async def sigkill(self, within: float = 2.0) -> list[int]:
        """SIGKILL the daemon; return its workers still alive ``within`` seconds later."""
        pids = [p for p in self.worker_pids() if pid_alive(p)]
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)
        deadline = time.monotonic() + within
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # observing the kernel: there is no event for another's death
        return [p for p in pids if pid_alive(p)]

    async def kill(self) -> None:
        """Cleanup: SIGKILL the daemon and, by pid, every worker it reported."""
        if self.proc.returncode is None:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)
        for pid in self.worker_pids():
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)


def idle(d: Daemon, learnt: int | None = None) -> set[int]:
    """The daemon's idle standbys (those that import ``learnt`` learnt modules)."""
    gone = {e["standby_pid"] for e in d.named("standby_state") if e["to"] in ("dead", "handed_out")}
    chosen = {e["standby_pid"] for e in d.named("standby_state", to="starting")
              if learnt is None or e["learnt"] == learnt}
    return {e["standby_pid"] for e in d.named("standby_state", to="idle")} - gone & chosen


async def pool_ready(d: Daemon, n: int = 2, learnt: int | None = None, timeout: float = 60) -> set[int]:
    """Wait until ``n`` standbys (that import ``learnt`` learnt modules) are idle at once."""
    await d.wait_for(lambda e: e["event"] == "standby_state" and len(idle(d, learnt)) >= n, timeout)
    return idle(d, learnt)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every IPv4/IPv6 TCP socket ``pid`` listens on, from /proc (the tables
    of ``pid``'s own network namespace)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in ((f"/proc/{pid}/net/tcp", 8), (f"/proc/{pid}/net/tcp6", 32)):
        with open(table) as fh:
            for row in list(fh)[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    addr, port = cols[1].split(":")
                    raw = bytes.fromhex(addr)
                    ip = ".".join(str(b) for b in raw[::-1]) if width == 8 else raw.hex()
                    found.add((ip, int(port, 16)))
    return found


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port that a listening socket holds for the duration."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


class Cluster:
    """The daemons of one multi-node job: a workdir (run dir) per node, one shared checkpoint
    dir, one worker per node; on loopback, or each node in its own network namespace (``net``,
    see :mod:`netns`). Node 0 hosts the rendezvous store, so any other node may be killed and
    restarted."""

    def __init__(self, root: Path, nnodes: int, args: tuple[str, ...], *, nnodes_spec: str | None = None,
                 per_node: list[list[str]] | None = None, rdzv_conf: str = "",
                 command: list[str] | None = None, net: Any = None, loopback: str = "127.0.0.1",
                 endpoint: str | None = None) -> None:
        """``endpoint``: a rendezvous store served apart (``supervisord-ft rdzv-store``), which no
        node hosts; by default node 0 hosts it."""
        self.root = root
        self.args = args
        self.spec = nnodes_spec or str(nnodes)
        self.per_node = per_node or [[] for _ in range(nnodes)]
        self.rdzv_conf = rdzv_conf
        self.command = command
        self.net = net
        self.addrs = net.addrs if net else [loopback] * nnodes
        ipv6 = ":" in self.addrs[0]
        with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET) as s:
            s.bind((loopback, 0))  # a namespace's ports are all free; loopback's are shared
            host = f"[{self.addrs[0]}]" if ipv6 else self.addrs[0]
            self.endpoint = endpoint or f"{host}:{s.getsockname()[1]}"
        self.apart = endpoint is not None
        self.nodes: list[Daemon] = []
        self.started: list[Daemon] = []  # every daemon ever started, for the cleanup

    def argv(self, n: int) -> list[str]:
        # On loopback every node's address is the endpoint's: say which one hosts. In namespaces
        # the daemons find out themselves (the endpoint's address is node 0's).
        host = "" if self.net else f"is_host={int(n == 0 and not self.apart)}"
        conf = ",".join(filter(None, [host, self.rdzv_conf]))
        return ["--nnodes", self.spec, "--nproc-per-node", "1", "--rdzv-endpoint", self.endpoint,
                "--rdzv-id", "test-job", "--local-addr", self.addrs[n], "--rdzv-conf", conf,
                "--checkpoint-dir", str(self.root / "ckpt"), *self.args, *self.per_node[n]]

    async def start_node(self, n: int) -> Daemon:
        """Start node ``n``'s daemon (again, after it died: same run dir)."""
        workdir = self.root / f"node{n}"
        workdir.mkdir(exist_ok=True)
        net = self.net
        d = await Daemon.start(workdir, *self.argv(n), command=self.command,
                               wrap=net.wrap(n) if net else None,
                               env={"GLOO_SOCKET_IFNAME": net.ifname} if net else None)
        self.started.append(d)
        while len(self.nodes) <= n:
            self.nodes.append(d)
        self.nodes[n] = d
        return d

    restart = start_node

    async def finish(self, timeout: float = 180, nodes: list[int] | None = None) -> list[int]:
        """Every (or each given) node's exit code, read to its end."""
        chosen = [self.nodes[n] for n in (nodes if nodes is not None else range(len(self.nodes)))]
        return list(await asyncio.gather(*(d.finish(timeout) for d in chosen)))

    async def kill(self) -> None:
        for d in self.started:
            await d.kill()
