"""7. Scale: 256 light (torch-free) workers under one launcher.

- all started: launcher start → the last worker's first line (its own wall clock);
- all reaped after a failure: once all run, the bench SIGKILLs one; → the last other worker's
  exit (pidfds). ``max_restarts 0``, so the launcher then exits;
- the launcher's own CPU seconds over the whole run (from /proc at its exit) and peak RSS.
"""

from __future__ import annotations

import asyncio
import random
import time

from .launch import COLD, TORCHRUN_DEFAULT, BenchError, Launch, Ours, Runner, watch_exit
from .report import Result, Summary, Table, ratios
from .workloads import LightJob

NAME = "scale"
JOB = LightJob()
RUNNERS: tuple[Runner, ...] = (Ours(options=COLD), TORCHRUN_DEFAULT)
TIMEOUT = 300.0
METRICS = ("all_started_s", "all_reaped_s", "cpu_s", "peak_rss_mib")


async def measure(runner: Runner, workers: int, seed: int) -> dict[str, float]:
    async with Launch(runner, JOB, workers, max_restarts=0) as run:
        ready: dict[int, float] = {}
        pids: dict[int, int] = {}
        async for r in run.follow(until=time.time() + TIMEOUT):
            if r.event == "step":
                ready[r.fields["rank"]] = r.time
                pids[r.fields["rank"]] = r.fields["pid"]
                if len(ready) == workers:
                    break
        if len(ready) < workers:
            raise BenchError(f"{runner.name}: {len(ready)} of {workers} workers started\n{run.stderr_tail()}")
        exits = {pid: watch_exit(pid) for pid in pids.values()}
        victim = run.kill_worker(random.Random(seed))
        async with asyncio.timeout(TIMEOUT):
            gone = await asyncio.gather(*(f for pid, f in exits.items() if pid != victim))
            killed = await exits[victim]
        await run.wait_exit(TIMEOUT)
    return {"all_started_s": max(ready.values()) - run.started, "all_reaped_s": max(gone) - killed,
            "cpu_s": run.usage.cpu_s, "peak_rss_mib": run.usage.peak_rss_kib / 1024}


async def run(quick: bool) -> Result:
    reps, workers = (1, 32) if quick else (2, 256)
    samples: dict[str, list[dict[str, float]]] = {r.name: [] for r in RUNNERS}
    for rep in range(reps):
        for runner in RUNNERS:
            samples[runner.name].append(await measure(runner, workers, rep))
    table = Table(f"{workers} light workers under one launcher",
                  ["launcher", "all started s", "all reaped after a failure s", "launcher CPU s", "peak RSS MiB",
                   "ours/this: started, reaped"])
    data: dict[str, object] = {"workers": workers}
    for runner in RUNNERS:
        runs = samples[runner.name]
        s = {m: Summary.of([r[m] for r in runs]) for m in METRICS}
        ratio = {m: ratios([r[m] for r in samples["ours"]], [r[m] for r in runs]) for m in METRICS[:2]}
        cell = "" if runner.name == "ours" else f"{ratio['all_started_s'].median:.2f}, {ratio['all_reaped_s'].median:.2f}"
        table.add(runner.name, s["all_started_s"].fmt(), s["all_reaped_s"].fmt(), s["cpu_s"].fmt(digits=2),
                  s["peak_rss_mib"].fmt(digits=1), cell)
        data[runner.name] = {**s, "ratio_ours_over": ratio if runner.name != "ours" else None, "samples": runs}
    table.notes.append(f"{reps} run(s) each, alternating. torchrun default (--monitor-interval 0.1).")
    return Result(NAME, [table], data)
