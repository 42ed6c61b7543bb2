"""Many ranks on one node: what broke on the way to 1,024 (BENCHMARKS.md §17), each at a size a test can afford."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import COLD, FAKE_WORKER, ROOT, matching
from supervisord_ft import diagnosis
from supervisord_ft.attempt import PHASES, Recovery
from supervisord_ft.channel import NO_SOCKET, Sockets
from supervisord_ft.config import FDS_BASE, FDS_PER_WORKER

# Ranks that serve a channel and nothing else: one process, a Unix socket per rank, each request
# answered with a stack. It holds its own descriptors, apart from the daemon's side under test.
CHANNELS = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
async def handle(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\n\\r\\nFile x.py:1\\n")
    await writer.drain()
    writer.close()
async def main():
    servers = [await asyncio.start_unix_server(handle, p) for p in sys.argv[1:]]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
"""


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    s = Sockets()
    yield s
    s.close()


@contextlib.asynccontextmanager
async def serving(paths: list[str]):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHANNELS, *paths, stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE)
    try:
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"ready\n"
        yield
    finally:
        proc.kill()
        await proc.wait()


# The daemon's side, in a process of its own under the soft limit the budget gives n ranks, with
# their 2n pipes held: every rank's channel asked at once, as a diagnosis does before any signal.
DIAGNOSIS = """
import asyncio, json, os, resource, sys
from supervisord_ft import diagnosis
soft, paths = int(sys.argv[1]), sys.argv[2:]
pipes = [os.pipe() for _ in paths]
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
reports = asyncio.run(diagnosis.collect(dict(enumerate(paths)), {r: os.getpid() for r in range(len(paths))}, False))
print(json.dumps({"stacks": sum(rep.stacks is not None for rep in reports.values()),
                  "emfile": sum("Too many open files" in p for rep in reports.values() for p in rep.problems)}))
"""


async def test_the_open_files_budget_holds_every_ranks_pipes_and_a_diagnosis_of_all_at_once(sockets):
    # With 3 descriptors per rank, a diagnosis of 1,024 ranks lost about half of them to EMFILE.
    n = 150
    paths = [sockets.path(0, r) for r in range(n)]
    async with serving(paths):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DIAGNOSIS, str(FDS_BASE + FDS_PER_WORKER * n), *paths,
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    assert proc.returncode == 0 and json.loads(out) == {"stacks": n, "emfile": 0}


async def test_ranks_that_serve_no_channel_are_not_connected_to_and_get_no_stack_file(sockets, tmp_path):
    served, silent = sockets.path(0, 0), sockets.path(0, 1)
    async with serving([served]):
        reports = await diagnosis.collect({0: served, 1: silent}, {0: os.getpid(), 1: os.getpid()}, outside=False)
    assert reports[1].problems == [f"channel: {NO_SOCKET}"] and reports[1].empty and not reports[0].empty
    assert await diagnosis.write(tmp_path / "d", diagnosis.diagnose(reports), 0, "test") is None
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["rank-0.txt"]


def test_a_recovery_whose_first_progress_comes_before_the_last_rank_is_started_has_sane_phases():
    # 1,024 ranks take 30 s to start; rank 0 steps long before. The phases were then counted from
    # a start time of 0: a relaunch of 0 s and a first progress of the machine's uptime.
    recovery = Recovery(since=100.0, detection=0.01, marks={"diagnosis": 100.1, "jit_wait": 100.1, "teardown": 100.4})
    phases = recovery.phases(0.0, 103.0)
    assert list(phases) == list(PHASES)
    assert phases["relaunch"] == pytest.approx(2.6) and phases["first_progress"] == 0
    assert sum(phases.values()) - phases["detection"] == pytest.approx(3.0)


def test_a_soft_open_files_limit_below_the_ranks_need_is_raised_to_the_hard_limit_and_said(tmp_path):
    n = 40
    out = subprocess.run(
        [sys.executable, "-m", "supervisord_ft", "run", "--num-workers", str(n), "--log-format", "json",
         "--run-dir", "r", "--checkpoint-dir", "c", *COLD, "--", *FAKE_WORKER, "--steps", "1"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096)),
        capture_output=True, text=True, cwd=tmp_path, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    [raised] = matching(events, "open_files_limit_raised")
    assert (raised["before"], raised["after"], raised["needed"]) == (64, 4096, FDS_BASE + FDS_PER_WORKER * n)
    assert len(matching(events, "worker_exited", returncode=0)) == n


async def test_a_hang_of_many_ranks_without_a_channel_reads_a_few_from_outside_at_a_time_within_the_bound(
        monkeypatch, tmp_path):
    # 1,024 py-spy processes at once ran the daemon out of descriptors (EMFILE, unhandled). A
    # py-spy of our own on PATH takes 0.5 s a rank: 2 at a time within 1.5 s read about 6 of 60.
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\nsleep 0.5\necho 'Thread 1 (active): MainThread'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(diagnosis, "PYSPY_AT_ONCE", 2)
    monkeypatch.setattr(diagnosis, "PYSPY_TIMEOUT", 1.5)
    t0 = time.monotonic()
    reports = await diagnosis.collect({}, {r: os.getpid() for r in range(60)}, outside=True)
    seconds = time.monotonic() - t0
    read = [r for r, rep in reports.items() if rep.stacks_from == "py-spy"]
    not_reached = [r for r, rep in reports.items() if any("not reached within 1.5 s" in p for p in rep.problems)]
    assert seconds < 1.5 + 1.0 and 1 <= len(read) <= 6, (seconds, read)
    assert len(not_reached) >= 60 - 2 - len(read)  # (the 2 still running at the bound: no stack within it)
