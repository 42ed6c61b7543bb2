"""The loop's collaborators are real seams: an in-process launcher and rendezvous drive it.

As torch's elastic tests script their agent, these fakes script every rank of every attempt in
the test's own event loop, so the loop's decisions are checked without a process in sight.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from supervisord_ft import envvars
from supervisord_ft.config import Config
from supervisord_ft.logs import EventBus, Log
from supervisord_ft.rendezvous import Endpoint, RankInfo, SingleNode
from supervisord_ft.supervisor import Supervisor
from supervisord_ft.workers import Started, WorkerSpec

FAKE_PID_BASE = 1 << 30  # above pid_max: never a real process, and never signalled for real


class FakeRank:
    """One scripted rank: it prints steps, exits when told, and obeys SIGTERM like a good worker."""

    def __init__(self, spec: WorkerSpec, pid: int) -> None:
        self.spec = spec
        self.pid = pid
        (self.stdout, self._out), (self.stderr, self._err) = os.pipe(), os.pipe()
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.signals: list[int] = []

    def step(self, n: int) -> None:
        os.write(self._out, b'{"event": "step", "step": %d}\n' % n)

    def exit(self, code: int, last_error: bytes = b"") -> None:
        if last_error:
            os.write(self._err, last_error + b"\n")
        self.close()
        self.status.set_result(code)

    def close(self) -> None:
        """The write ends, as a process's exit closes them."""
        for fd in (self._out, self._err):
            if fd >= 0:
                os.close(fd)
        self._out = self._err = -1

    def forward(self, sig: int) -> bool:
        self.signals.append(sig)
        return True

    def signal_group(self, sig: int) -> bool:
        if self.status.done():
            return False
        self.signals.append(sig)
        self.exit(-sig)
        return True


class FakeLauncher:
    def __init__(self, script: Callable[[FakeRank, int], Awaitable[None]]) -> None:
        self.script = script
        self.ranks: list[FakeRank] = []
        self.closed = False
        self.settled_after: list[int] = []  # ranks started when each ``settled`` came
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, spec: WorkerSpec) -> Started:
        rank = FakeRank(spec, FAKE_PID_BASE + len(self.ranks))
        self.ranks.append(rank)
        attempt = int(spec.env[envvars.RESTART_COUNT])
        self._tasks.append(asyncio.create_task(self.script(rank, attempt)))
        return Started(rank.pid, lambda: rank.status, rank.signal_group, rank.forward,
                       (rank.stdout, rank.stderr))

    def settled(self) -> None:
        self.settled_after.append(len(self.ranks))

    async def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()
        for rank in self.ranks:
            rank.close()


class FakeRendezvous(SingleNode):
    def __init__(self) -> None:
        self.rounds: list[int] = []
        self.closed = False

    def check(self) -> None:
        pass

    async def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        self.rounds.append(attempt)
        ranks = [RankInfo(r, r, local_world_size, local_world_size) for r in range(local_world_size)]
        return Endpoint("fake-host", 40000 + attempt), ranks

    async def close(self, outcome: str = "", reason: str = "", signal: int | None = None) -> None:
        self.closed = True


async def supervise(tmp_path: Path, launcher: FakeLauncher, rendezvous: FakeRendezvous,
                    **overrides: object) -> tuple[int, list[dict], Supervisor]:
    cfg = Config(**{"num_workers": 2, "checkpoint_dir": tmp_path / "ckpt", "run_dir": tmp_path,
                    "restart_backoff": 0.0, "command": ("fake-train",), **overrides})
    bus, events = EventBus(), []
    bus.subscribe(events.append)
    sup = Supervisor(cfg, Log(None, bus=bus).logger,
                     launcher=launcher, rendezvous=rendezvous)
    async with asyncio.timeout(10):
        code = await sup.run()
    return code, events, sup


def named(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]


async def test_a_scripted_crash_is_recovered_through_the_seams(tmp_path):
    async def script(rank: FakeRank, attempt: int) -> None:
        for n in range(1, 4):
            rank.step(n)
            await asyncio.sleep(0)
        if attempt == 0 and rank.spec.rank.rank == 1:
            rank.exit(7, b"RuntimeError: injected")
        elif attempt > 0:
            rank.exit(0)  # attempt 0's rank 0 waits for SIGTERM

    launcher, rendezvous = FakeLauncher(script), FakeRendezvous()
    code, events, sup = await supervise(tmp_path, launcher, rendezvous)
    assert code == 0
    assert [e["to"] for e in named(events, "state_changed")] == [
        "RUNNING", "RECOVERING", "LAUNCHING", "RUNNING", "DONE"]
    assert rendezvous.rounds == [0, 1]
    assert [e["attempt"] for e in named(events, "worker_started")] == [0, 0, 1, 1]
    assert [e["master_port"] for e in named(events, "launching")] == [40000, 40001]
    assert launcher.ranks[0].signals == [signal.SIGTERM]  # the survivor was torn down
    assert named(events, "state_changed")[1]["reason"].startswith("rank 1 exited with 7")
    relaunched = launcher.ranks[2].spec
    assert relaunched.env[envvars.TORCHELASTIC_RESTART_COUNT] == "1"
    assert relaunched.env[envvars.MASTER_PORT] == "40001" and relaunched.argv == ("fake-train",)
    assert named(events, "recovered")[0]["attempt"] == 1
    assert launcher.closed and rendezvous.closed and sup.restarts == 1
    assert named(events, "supervisor_exit")[0]["attempts"] == 2
    # once per attempt, at its first step (so after some rank of that attempt was started)
    assert len(launcher.settled_after) == 2 and launcher.settled_after[1] > 2


async def test_the_first_failure_is_chosen_by_time_not_by_set_order(tmp_path):
    async def script(rank: FakeRank, attempt: int) -> None:
        if attempt > 0:
            rank.exit(0)
            return
        rank.step(1)
        await asyncio.sleep(0.05)
        if rank.spec.rank.rank == 3:  # ranks 3 then 1 fail in the same loop iteration
            rank.exit(7, b"first")
            launcher.ranks[1].exit(9, b"second")

    launcher, rendezvous = FakeLauncher(script), FakeRendezvous()
    code, events, _ = await supervise(tmp_path, launcher, rendezvous, num_workers=4)
    assert code == 0
    assert named(events, "state_changed")[1]["reason"].startswith("rank 3 exited with 7: first")
    exits = [(e["rank"], e["returncode"]) for e in named(events, "worker_exited") if e["attempt"] == 0]
    assert exits[:2] == [(3, 7), (1, 9)]


async def test_a_bug_in_a_background_task_is_said_and_the_task_goes_on(tmp_path, monkeypatch):
    """The output emitter and the status ticker each raise once (a bug): each says so, runs
    again, and the run ends as it would have (was: the task died silently; the emitter's
    death stopped every line after it, and the progress read from them)."""
    from supervisord_ft import output, supervisor

    def once(real, fault):
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise fault
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(output, "_emit", once(output._emit, KeyError("a bug in the emitter")))
    monkeypatch.setattr(supervisor, "daemon_usage", once(supervisor.daemon_usage, ValueError("a bug in the ticker")))

    async def script(rank: FakeRank, attempt: int) -> None:
        for n in range(1, 6):
            rank.step(n)
            await asyncio.sleep(0.02)
        rank.exit(0)

    code, events, _ = await supervise(tmp_path, FakeLauncher(script), FakeRendezvous(), poll_interval=0.01)
    assert code == 0
    failed = {e["task"]: e for e in named(events, "task_failed")}
    assert set(failed) == {"output-emitter", "status"}
    assert failed["output-emitter"]["reason"] == "KeyError: 'a bug in the emitter'"
    assert failed["status"]["where"].endswith("in wrapped") and failed["status"]["failures"] == 1
    steps = [e["worker_step"] for e in named(events, "worker_output")]
    assert len(steps) == 9 and steps.count(5) == 2  # one line lost to the bug, the rest logged
    assert len(named(events, "status")) > 1  # ticking after its failure too
