"""The watchdog's judgment of a silent rank's I/O (supervisord_ft/watchdog.py with progress.py's
Looker), against a real process whose reads and writes the kernel counts: what a rank read
before its last progress is not progress in its silence; steady I/O in its silence is."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import pytest

from supervisord_ft.progress import IO_PROGRESS_BYTES, Looker
from supervisord_ft.watchdog import CONFIRM_LOOK, Watchdog

# Reads a line per order from stdin: "read" reads 64 MiB of /dev/zero at once and says "done";
# "write" writes 2 MiB to /dev/null every 0.1 s until stdin closes.
RANK = """
import os, sys, time
for order in sys.stdin:
    if order.strip() == "read":
        with open("/dev/zero", "rb", buffering=0) as z:
            for _ in range(64):
                z.read(1 << 20)
        print("done", flush=True)
    else:
        while True:
            os.write(os.open(os.devnull, os.O_WRONLY), bytes(2 << 20))
            time.sleep(0.1)
"""
TIMEOUT = 2.0


@pytest.fixture
async def rank():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", RANK, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def watch(pid: int) -> Watchdog:
    dog = Watchdog([0], TIMEOUT, startup_timeout=60, clock=time.monotonic)
    dog.look = Looker({}, {0: pid}, dog.last).look  # its I/O counter read now, as at a launch
    return dog


async def test_what_a_rank_read_before_its_last_progress_does_not_delay_its_hang(rank):
    dog = watch(rank.pid)
    rank.stdin.write(b"read\n")  # an import's megabytes, after the launch's reading
    async with asyncio.timeout(30):
        assert await rank.stdout.readline() == b"done\n"
        dog.step(0)  # then its first step, then silence
        stepped = time.monotonic()
        hangs = await dog.expired(lambda: [0])
    assert 64 << 20 > IO_PROGRESS_BYTES
    # Silent since the step, not since the silence's first look (where the read, counted as
    # progress then, put off the hang by a whole limit).
    assert hangs[0].silent_for == pytest.approx(time.monotonic() - stepped, abs=0.2)
    assert hangs[0].silent_for < TIMEOUT + CONFIRM_LOOK + 1


async def test_steady_io_in_a_ranks_silence_is_progress(rank):
    dog = watch(rank.pid)
    dog.step(0)
    rank.stdin.write(b"write\n")
    expired = asyncio.ensure_future(dog.expired(lambda: [0]))
    try:
        done, _ = await asyncio.wait([expired], timeout=3 * TIMEOUT)
        assert not done  # alive while it writes
        rank.kill()  # its I/O stops (the process is gone, its counters unreadable): a hang
        async with asyncio.timeout(5 * TIMEOUT):
            assert (await expired)[0].rank == 0
    finally:
        expired.cancel()
