"""17. Many ranks on one node (1,024 in the full run): light (torch-free) ranks under one launcher.

One group of N ranks, relaunched after each of several SIGKILLs of one rank (``max_restarts``
= the number of kills, backoff 0). Per kill, from the bench's ``kill()`` (wall clock):

- detection: → the launcher says the rank exited. Ours: its ``worker_exited`` event's timestamp.
  torchrun says nothing per rank until its teardown is over; its first word of the failure is
  ``Sending process <pid> closing signal SIGTERM`` on stderr (millisecond stamps);
- signalled: → the first other rank's own ``sigterm`` line (both launchers, the worker's clock);
- teardown: → the last other rank of the group gone (pidfds);
- running again: → every rank of the next attempt has printed its first line.

Then the launcher's footprint with N ranks running: its RSS (and per rank), open descriptors,
CPU to start them. And the CPU it spends per line of output: a second launch whose ranks each
print a short JSON line every ``1 / RATE`` s (one write per line, as ``print`` in a training
loop); once every rank prints, the launcher's CPU over a window of WINDOW s (from /proc) divided
by the lines that came through it. torchrun does not read its workers' output (they inherit its
stdout), so its CPU there is its monitor loop, not a cost per line.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import os
import random
import re
import signal
import time
from dataclasses import dataclass

from supervisord_ft import procfs

from .launch import COLD, TORCHRUN_DEFAULT, BenchError, Launch, Ours, Record, Runner, cpu_seconds, watch_exit
from .report import Result, Summary, Table
from .workloads import LightJob

NAME = "ranks"
RUNNERS: tuple[Runner, ...] = (Ours(options=COLD), TORCHRUN_DEFAULT)
HOLD = LightJob()
RATE = 10.0  # lines per second per rank in the output phase: 10,240 lines/s at 1,024 ranks
START_TIMEOUT = 300.0  # 1,024 interpreters on 2 cores start in about 20 s
WINDOW = 5.0  # seconds of output measured
# torchrun's log line for each survivor it signals: "W1206 23:20:15.854000 <pid> <file>:<line>] Sending process ..."
TORCHRUN_SIGTERM = re.compile(rb"^[IWE](\d{4} \d\d:\d\d:\d\d\.\d{6}) \d+ \S+\] Sending process \d+ closing signal SIGTERM",
                              re.M)


@dataclass(frozen=True)
class Size:
    workers: int
    kills: int


QUICK, FULL = (Size(32, 2),), (Size(256, 4), Size(1024, 4))


async def all_running(run: Launch, attempt: int, workers: int) -> dict[int, Record]:
    """Each rank's first line of ``attempt``, once every rank has printed it."""
    seen: dict[int, Record] = {}
    async for r in run.follow(until=time.time() + START_TIMEOUT):
        if r.event == "step" and r.fields.get("attempt") == attempt:
            seen[r.fields["rank"]] = r
            if len(seen) == workers:
                return seen
    spawned = len(run.named("worker_started", attempt=attempt))
    dropped = sum(r.fields.get("lines", 0) for r in run.named("worker_output_dropped"))
    raise BenchError(f"{run.runner.name}: {len(seen)} of {workers} ranks of attempt {attempt} printed their first "
                     f"line within {START_TIMEOUT:g} s (ours: {spawned} spawned, {dropped} lines dropped)\n"
                     f"{run.stderr_tail()}")


def torchrun_signals(run: Launch) -> list[float]:
    """When torchrun said it signalled a survivor, from its stderr (its local time, milliseconds)."""
    year = datetime.datetime.now().year
    text = (run.workdir / "stderr.log").read_bytes()
    return sorted(datetime.datetime.strptime(f"{year}{m.decode()}", "%Y%m%d %H:%M:%S.%f").timestamp()
                  for m in TORCHRUN_SIGTERM.findall(text))


def footprint(pid: int, workers: int) -> dict[str, float]:
    rss = int((procfs.status_field(pid, "VmRSS") or "0 kB").split()[0]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mib": rss, "rss_kib_per_rank": rss * 1024 / workers, "fds": fds}


async def recoveries(runner: Runner, size: Size, seed: int) -> dict[str, object]:
    """Start the group, then kill one rank ``size.kills`` times, each after the group runs again."""
    rng = random.Random(seed)
    kills: list[dict[str, float]] = []
    async with Launch(runner, HOLD, size.workers, max_restarts=size.kills) as run:
        ranks = await all_running(run, 0, size.workers)
        started = max(r.time for r in ranks.values()) - run.started
        start_cpu = cpu_seconds(run.pid) or 0.0
        held = footprint(run.pid, size.workers)
        for attempt in range(size.kills):
            pids = {r.fields["pid"] for r in ranks.values()}
            exits = {pid: watch_exit(pid) for pid in pids}
            victim = rng.choice(sorted(pids))
            killed = time.time()
            os.kill(victim, signal.SIGKILL)
            exited = await run.wait_for(lambda r: r.event == "worker_exited" and r.fields.get("pid") == victim,
                                        START_TIMEOUT, f"exit of {victim}") if runner.name == "ours" else None
            signalled = await run.wait_for(lambda r: r.event == "sigterm" and r.fields.get("attempt") == attempt,
                                           START_TIMEOUT, "a survivor's SIGTERM")
            async with asyncio.timeout(START_TIMEOUT):
                gone = max(await asyncio.gather(*(f for pid, f in exits.items() if pid != victim)))
            ranks = await all_running(run, attempt + 1, size.workers)
            back = max(r.time for r in ranks.values())
            kills.append({"detection_s": (exited.time if exited else torchrun_said(run, killed)) - killed,
                          "signalled_s": signalled.time - killed, "teardown_s": gone - killed,
                          "running_again_s": back - killed, "relaunch_s": back - gone})
            if recovered := run.named("recovered", attempt=attempt + 1):  # ours: where its time went
                kills[-1]["phases"] = recovered[0].fields["phases"]
    return {"started_s": started, "start_cpu_s": start_cpu, **held, "kills": kills}


def torchrun_said(run: Launch, killed: float) -> float:
    """torchrun's first word of a failure after ``killed`` (its stamps are cut to the millisecond)."""
    return next((t for t in torchrun_signals(run) if t >= killed - 0.001), float("nan"))


async def output_cost(runner: Runner, workers: int) -> dict[str, float]:
    """The launcher's CPU per line while ``workers`` ranks print RATE lines/s each."""
    job = LightJob(("--flood-lines", str(int(RATE * 3600)), "--flood-rate", str(RATE), "--flood-batch", "1"))
    async with Launch(runner, job, workers) as run:
        await all_running(run, 0, workers)
        lines = lambda: sum(1 for r in run.records if r.event == "tick")  # noqa: E731
        dropped = lambda: sum(r.fields.get("lines", 0) for r in run.named("worker_output_dropped"))  # noqa: E731
        await run.wait_for(lambda r: r.event == "tick", START_TIMEOUT, "output")
        cpu0, lines0, t0 = cpu_seconds(run.pid) or 0.0, lines(), time.time()
        async for _ in run.follow(until=t0 + WINDOW):
            pass
        cpu1, lines1, t1 = cpu_seconds(run.pid) or 0.0, lines(), time.time()
        if lines1 == lines0:
            raise BenchError(f"{runner.name}: no output in {WINDOW:g} s\n{run.stderr_tail()}")
        return {"lines_per_s": (lines1 - lines0) / (t1 - t0), "cpu_per_s": (cpu1 - cpu0) / (t1 - t0),
                "cpu_us_per_line": (cpu1 - cpu0) / (lines1 - lines0) * 1e6, "dropped": dropped()}


async def run(quick: bool) -> Result:
    sizes = QUICK if quick else FULL
    data: dict[str, object] = {"rate_per_rank": RATE, "window_s": WINDOW}
    table = Table("Many light ranks under one launcher: one rank SIGKILLed, the group relaunched",
                  ["ranks", "launcher", "all started s", "its CPU to start s (ms/rank)", "detection s (p99)",
                   "signalled s", "teardown s", "running again s", "RSS MiB (KiB/rank)", "fds",
                   "CPU µs/line (lines/s)"])
    for size in sizes:
        for seed, runner in enumerate(RUNNERS):
            try:
                rec = await recoveries(runner, size, seed)
            except BenchError as exc:  # a launcher that cannot hold N ranks: say what it did not do
                data[f"{runner.name} {size.workers}"] = {"failed": str(exc)}
                table.add(size.workers, runner.name, f"failed: {str(exc).splitlines()[0]}", *[""] * 8)
                continue
            try:
                out = await output_cost(runner, size.workers)
            except BenchError as exc:
                out = {"failed": str(exc), "cpu_us_per_line": math.nan, "lines_per_s": math.nan}
            kills = rec["kills"]
            s = {k: Summary.of([x[k] for x in kills], p99=k == "detection_s") for k in kills[0] if k != "phases"}  # type: ignore[index]
            data[f"{runner.name} {size.workers}"] = {**rec, **s, "output": out}
            table.add(size.workers, runner.name, f"{rec['started_s']:.2f}",
                      f"{rec['start_cpu_s']:.2f} ({rec['start_cpu_s'] / size.workers * 1e3:.2f})",
                      f"{s['detection_s'].fmt()} ({s['detection_s'].p99:.3f})", s["signalled_s"].fmt(),
                      s["teardown_s"].fmt(), s["running_again_s"].fmt(),
                      f"{rec['rss_mib']:.1f} ({rec['rss_kib_per_rank']:.1f})", rec["fds"],
                      f"failed: {out['failed'].splitlines()[0]}" if "failed" in out else
                      f"{out['cpu_us_per_line']:.1f} ({out['lines_per_s']:.0f})")
    table.notes.append(f"{sizes[0].kills} kill(s) per size and launcher, each after the group ran again; "
                       f"output: {RATE:g} lines/s per rank, {WINDOW:g} s window. torchrun default "
                       "(--monitor-interval 0.1); its detection is its first 'Sending process ... SIGTERM'.")
    return Result(NAME, [table], data)
