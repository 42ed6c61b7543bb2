"""4. Goodput under a fault schedule: useful steps per second as a fraction of the fault-free rate.

The job: 2 ranks, ~12 ms steps, a checkpoint every 100 steps (~1.2 s of work), never finishing
on its own. Every T seconds after launch the bench SIGKILLs a random rank (the same victims for
both launchers); at the end of a fixed wall-clock budget it reads the job's progress: the
highest step completed by then (steps redone after a crash count once). Goodput = progress /
budget; its fraction = goodput / the same launcher's fault-free goodput over the same budget
(read from one fault-free run as long as the longest budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from .launch import TORCHRUN_TUNED, Launch, Ours, Runner
from .report import Result, Summary, Table, ratios
from .workloads import TrainJob

NAME = "goodput"
WORKERS = 2
JOB = TrainJob(checkpoint_interval=100)
RUNNERS: tuple[Runner, ...] = (Ours(), TORCHRUN_TUNED)


async def _faults(run: Launch, period: float, rng: random.Random) -> None:
    k = 1
    while True:
        await asyncio.sleep(run.started + k * period - time.time())
        run.kill_worker(rng)
        k += 1


async def progress(runner: Runner, budget: float, period: float | None, seed: int,
                   also_at: tuple[float, ...] = ()) -> dict[float, int]:
    """The highest completed step at ``budget`` (and at each of ``also_at``) seconds after launch."""
    marks = sorted({*also_at, budget})
    async with Launch(runner, JOB, WORKERS, max_restarts=10_000) as run:
        faults = asyncio.create_task(_faults(run, period, random.Random(seed))) if period else None
        try:
            async for _ in run.follow(until=run.started + budget):
                if faults is not None and faults.done():
                    faults.result()  # a failed kill ends the measurement with its error
        finally:
            if faults is not None:
                faults.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await faults
    steps = [(r.time - run.started, r.fields["step"]) for r in run.named("step")]
    return {m: max((s for t, s in steps if t <= m), default=0) for m in marks}


async def run(quick: bool) -> Result:
    schedules = ((4.0, 8.0),) if quick else ((10.0, 40.0), (30.0, 90.0))  # (T, budget)
    longest = max(b for _, b in schedules)
    budgets = tuple(b for _, b in schedules)
    table = Table("Goodput under faults: a random rank SIGKILLed every T s",
                  ["T s", "budget s", "launcher", "kills", "steps/s fault-free", "steps/s with faults",
                   "fraction of fault-free", "ours/this: goodput"])
    data: dict[str, object] = {"checkpoint_interval": JOB.checkpoint_interval}
    clean = {r.name: await progress(r, longest, None, 0, budgets) for r in RUNNERS}
    for period, budget in schedules:
        rates = {}
        for runner in RUNNERS:
            faulty = (await progress(runner, budget, period, int(period)))[budget] / budget
            rates[runner.name] = (clean[runner.name][budget] / budget, faulty)
        for runner in RUNNERS:
            free, faulty = rates[runner.name]
            ratio = ratios([rates["ours"][1]], [faulty]) if runner.name != "ours" else None
            table.add(f"{period:g}", f"{budget:g}", runner.name, int((budget - 1e-9) // period), f"{free:.1f}",
                      f"{faulty:.1f}", f"{faulty / free:.3f}", ratio.fmt() if ratio else "")
            data[f"T{period:g}/{runner.name}"] = {"budget_s": budget, "fault_free_steps_per_s": free,
                                                 "faulty_steps_per_s": faulty, "fraction": Summary.of([faulty / free]),
                                                 "ratio_ours_over": ratio}
    table.notes.append("One run per cell (the budgets are long); fault-free rates come from one run per launcher. "
                       "Rates include the initial start-up, as a real job's would.")
    return Result(NAME, [table], data)
