"""Runs the real daemon as a subprocess and reads its JSON events: shared by every test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisord_ft.procfs import alive as pid_alive

ROOT = Path(__file__).resolve().parent.parent
FAKE_WORKER = [sys.executable, str(Path(__file__).with_name("fake_worker.py"))]
Event = dict[str, Any]



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
    async def start(cls, workdir: Path, *args: str, command: list[str] | None = None) -> "Daemon":
        argv = [sys.executable, "-m", "supervisord_ft", "run", "--log-format", "json",
                "--checkpoint-dir", str(workdir / "ckpt"), "--run-dir", str(workdir / "run"), *args]
        if command:
            argv += ["--", *command]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=1 << 24)
        return cls(proc, workdir)

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
            while await self._next() is not None:
                pass
            assert self.proc.stderr is not None
            self.stderr = (await self.proc.stderr.read()).decode()
            return await self.proc.wait()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def named(self, name: str, **match: Any) -> list[Event]:
        return [e for e in self.events if e["event"] == name
                and all(e.get(k) == v for k, v in match.items())]

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
