"""3. Steps lost per crash, and the wall time to finish a fixed job with K crashes vs fault-free.

The job: 2 ranks, S steps of ~12 ms each, a checkpoint every C steps. In a faulty run the bench
SIGKILLs a random rank the first time the job's progress reaches each of K step thresholds
(evenly spaced, each plus a random offset within a checkpoint interval; the same thresholds and
victims for both launchers of a pair). Every rank prints every step it completes, so

- steps lost per crash = (step lines / ranks − S) / K: each step done twice was lost once;
- wall time = launcher start → launcher exit 0; overhead per crash = (faulty − fault-free) / K.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .launch import TORCHRUN_TUNED, Launch, Ours, Runner
from .report import Result, Summary, Table, ratios
from .workloads import TrainJob

NAME = "steps_lost"
WORKERS = 2
RUNNERS: tuple[Runner, ...] = (Ours(), TORCHRUN_TUNED)
TIMEOUT = 600.0


@dataclass(frozen=True)
class Finish:
    wall: float
    steps_lost: float  # per crash


async def finish(runner: Runner, job: TrainJob, thresholds: list[int], seed: int) -> Finish:
    rng = random.Random(seed)
    async with Launch(runner, job, WORKERS, max_restarts=len(thresholds) + 3) as run:
        pending, best = list(thresholds), 0
        async for r in run.follow(until=time.time() + TIMEOUT):
            if not pending:
                break
            if r.event == "step" and (best := max(best, r.fields["step"])) >= pending[0]:
                run.kill_worker(rng)
                pending.pop(0)
        if await run.wait_exit(TIMEOUT) != 0:
            raise RuntimeError(f"{runner.name}: exit {run.returncode}\n{run.stderr_tail()}")
    assert run.exited_at is not None
    done = len(run.named("step")) / WORKERS
    return Finish(run.exited_at - run.started, (done - job.steps) / len(thresholds) if thresholds else 0.0)


async def run(quick: bool) -> Result:
    reps, steps, interval, crashes = (1, 150, 25, 1) if quick else (3, 400, 50, 3)
    job = TrainJob(steps=steps, checkpoint_interval=interval)
    clean: dict[str, list[Finish]] = {r.name: [] for r in RUNNERS}
    faulty: dict[str, list[Finish]] = {r.name: [] for r in RUNNERS}
    for rep in range(reps):
        rng = random.Random(rep)
        thresholds = [steps * (i + 1) // (crashes + 1) + rng.randrange(interval) for i in range(crashes)]
        for runner in RUNNERS:
            clean[runner.name].append(await finish(runner, job, [], rep))
            faulty[runner.name].append(await finish(runner, job, thresholds, rep))

    table = Table(f"Finishing {steps} steps (checkpoint every {interval}) with {crashes} crash(es) vs none",
                  ["launcher", "fault-free wall s", f"{crashes} crash(es) wall s", "overhead per crash s",
                   "steps lost per crash", "ours/this: faulty wall", "ours/this: overhead per crash"])
    overhead = {n: [(f.wall - c.wall) / crashes for f, c in zip(faulty[n], clean[n])] for n in clean}
    data: dict[str, object] = {"steps": steps, "checkpoint_interval": interval, "crashes": crashes}
    for runner in RUNNERS:
        n = runner.name
        row = {"fault_free_wall_s": Summary.of([c.wall for c in clean[n]]),
               "faulty_wall_s": Summary.of([f.wall for f in faulty[n]]),
               "overhead_per_crash_s": Summary.of(overhead[n]),
               "steps_lost_per_crash": Summary.of([f.steps_lost for f in faulty[n]])}
        if n != "ours":
            row["ratio_faulty_wall"] = ratios([f.wall for f in faulty["ours"]], [f.wall for f in faulty[n]])
            row["ratio_overhead_per_crash"] = ratios(overhead["ours"], overhead[n])
        table.add(n, *(row[k].fmt() for k in ("fault_free_wall_s", "faulty_wall_s", "overhead_per_crash_s")),
                  row["steps_lost_per_crash"].fmt(digits=1),
                  *(row[k].fmt() if k in row else "" for k in ("ratio_faulty_wall", "ratio_overhead_per_crash")))
        data[n] = row
    table.notes.append(f"{reps} pairs; the faults are SIGKILLs of a random rank at the same step thresholds for both "
                       f"launchers of a pair. torchrun tuned: --monitor-interval 0.001, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.")
    return Result(NAME, [table], data)
