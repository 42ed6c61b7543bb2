"""9. A stdout reader that stops reading: does the daemon, and do the workers, wait for it?

Our daemon runs 2 light ranks that each print 10,000 short JSON lines a second (a log-heavy
job), its stdout a pipe that the bench does not read for ``PAUSE`` seconds (a paused ``less``,
a stalled log shipper). During the pause the bench SIGKILLs rank 1 (at 30 % of it) and sends the
daemon SIGTERM (at 60 %); then it reads again. From ``events.jsonl`` (the daemon's record, which
does not depend on stdout):

- detection: the SIGKILL → the daemon's ``worker_exited`` for that rank;
- relaunch: the SIGKILL → the next attempt's rank 1 ``worker_started`` (none: the stop came first);
- SIGTERM: the signal → ``state_changed`` to STOPPING;
- worker stall: the longest gap between two consecutive batches of a rank's lines (one batch of
  100 lines every 10 ms, each stamped on the worker's own clock when written), minus those 10 ms:
  how long a worker was blocked writing to a daemon that did not read its pipe.

torchrun is not run: its workers write to the same stdout themselves, so a paused reader stops
them directly, by design.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from typing import Any

from .launch import COLD, Launch, Ours, iso_time
from .report import Result, Table
from .workloads import LightJob

NAME = "slow_consumer"
RATE = 10_000  # lines per second per rank
FLOOD = 10_000_000  # "as fast as they can": the fake worker's pacing never waits at this rate
FLOOD_LINES = 20_000_000  # per rank: more than the run lasts
BATCH = 100  # lines per write (light_worker.BATCH)
TIMEOUT = 120.0


async def paused(pause: float, rate: int = RATE) -> dict[str, Any]:
    lines = FLOOD_LINES if rate >= FLOOD else int(rate * (pause + 30))
    job = LightJob(("--flood-lines", str(lines), "--flood-rate", str(rate)))
    r, w = os.pipe()
    try:
        async with Launch(Ours(options=COLD), job, workers=2, max_restarts=1, capture=False, stdout=w) as run:
            os.close(w)
            w = -1
            events = run.workdir / "run" / "events.jsonl"
            started = time.time()
            victim = await _first(events, lambda e: e["event"] == "worker_started" and e["rank"] == 1)
            await asyncio.sleep(started + 0.3 * pause - time.time())  # the fault's moment, not a wait for one
            killed = time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            await asyncio.sleep(started + 0.6 * pause - time.time())
            stopped = time.time()
            run.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(started + pause - time.time())
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                asyncio.Protocol, os.fdopen(r, "rb", 0))  # the reader is back; it discards
            r = -1
            try:
                await run.wait_exit(TIMEOUT)
            finally:
                transport.close()
            log = [json.loads(line) for line in events.read_text().splitlines()]
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)

    def when(pred: Any) -> float:
        return next((iso_time(e["timestamp"]) for e in log if pred(e)), math.nan)  # nan: never happened

    return {
        "detection_s": when(lambda e: e["event"] == "worker_exited" and e["pid"] == victim["pid"]) - killed,
        "relaunch_s": when(lambda e: e["event"] == "worker_started" and e["rank"] == 1
                           and e["attempt"] > victim["attempt"]) - killed,
        "sigterm_s": when(lambda e: e["event"] == "state_changed" and e["to"] == "STOPPING") - stopped,
        "stall_s": _longest_stall(log),
        "stdout_dropped": sum(e["lines"] for e in log if e["event"] == "stdout_dropped"),
        "output_dropped": sum(e["lines"] for e in log if e["event"] == "worker_output_dropped"),
    }


def _longest_stall(log: list[dict[str, Any]]) -> float:
    """Per rank and attempt: the longest gap between consecutive batches, less the batch period."""
    batches: dict[tuple[int, int], dict[int, float]] = {}
    for e in log:
        if e.get("worker_event") == "tick":
            batches.setdefault((e["rank"], e["attempt"]), {})[e["i"] // BATCH] = e["t"]
    gaps = [times[k + 1] - times[k] for times in batches.values() for k in times if k + 1 in times]
    return max(gaps) - BATCH / RATE


async def _first(path: os.PathLike[str], pred: Any, timeout: float = 30.0) -> dict[str, Any]:
    """The first event of the events file matching ``pred``; it polls (a file's growth is no
    awaitable event)."""
    async with asyncio.timeout(timeout):
        while True:
            if os.path.exists(path):
                with open(path) as fh:
                    for line in fh:
                        if line.endswith("\n") and pred(event := json.loads(line)):
                            return event
            await asyncio.sleep(0.02)


async def run(quick: bool) -> Result:
    pause = 2.0 if quick else 10.0
    table = Table(f"A stdout reader paused for {pause:g} s: the daemon and its workers (s)",
                  ["ranks print", "SIGKILL → detected", "SIGKILL → relaunched", "SIGTERM → STOPPING",
                   "longest worker stall", "stdout lines dropped", "worker lines dropped"])
    data: dict[str, Any] = {"pause_s": pause}
    for rate in (RATE, FLOOD):
        m = data[str(rate)] = await paused(pause, rate)
        relaunch = "none" if math.isnan(m["relaunch_s"]) else f"{m['relaunch_s']:.3f}"
        table.add(f"{rate:,} lines/s" if rate < FLOOD else "as fast as they can", f"{m['detection_s']:.3f}",
                  relaunch, f"{m['sigterm_s']:.3f}", f"{m['stall_s']:.3f}", f"{m['stdout_dropped']:,}",
                  f"{m['output_dropped']:,}")
    table.notes.append(f"2 ranks; SIGKILL of rank 1 at {0.3 * pause:g} s, SIGTERM at {0.6 * pause:g} s, the reader "
                       f"back at {pause:g} s. One run per row.")
    return Result(NAME, [table], data)
