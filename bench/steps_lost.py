"""3. Steps lost per crash, and the wall time to finish a fixed job with K crashes vs fault-free.

The job: 2 ranks, S steps of ~12 ms each, a checkpoint every C steps. In a faulty run the bench
SIGKILLs a random rank the first time the job's progress reaches each of K step thresholds
(evenly spaced, each plus a random offset within a checkpoint interval, the first one a
checkpointed step, so the kill often lands while the background save is in flight; the same
thresholds and victims for every launcher of a pair). The built-in job's survivors save their
last completed step just in time; "JIT off" runs it with ``--no-jit_checkpoint`` (what any
script without it loses). torchrun runs the same job, JIT saves included: they are the script's.
Every rank prints every step it completes, so

- steps lost per crash = (step lines / ranks − S) / K: each step done twice was lost once;
- wall time = launcher start → launcher exit 0; overhead per crash = (faulty − fault-free) / K.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace

from .launch import TORCHRUN_TUNED, Launch, Ours, Runner
from .report import Result, Summary, Table, ratios
from .workloads import TrainJob

NAME = "steps_lost"
WORKERS = 2
# (row label, launcher, whether the job saves just in time)
VARIANTS: tuple[tuple[str, Runner, bool], ...] = (
    ("ours", Ours(), True), ("ours, JIT off", Ours(), False), ("torchrun tuned", TORCHRUN_TUNED, True))
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
    clean: dict[str, list[Finish]] = {label: [] for label, _, _ in VARIANTS}
    faulty: dict[str, list[Finish]] = {label: [] for label, _, _ in VARIANTS}
    for rep in range(reps):
        rng = random.Random(rep)
        thresholds = [steps * (i + 1) // (crashes + 1) + rng.randrange(interval) for i in range(crashes)]
        thresholds[0] -= thresholds[0] % interval  # a checkpointed step: kill beside a save
        for label, runner, jit in VARIANTS:
            variant = replace(job, jit_checkpoint=jit)
            clean[label].append(await finish(runner, variant, [], rep))
            faulty[label].append(await finish(runner, variant, thresholds, rep))

    table = Table(f"Finishing {steps} steps (checkpoint every {interval}) with {crashes} crash(es) vs none",
                  ["launcher", "fault-free wall s", f"{crashes} crash(es) wall s", "overhead per crash s",
                   "steps lost per crash", "ours/this: faulty wall", "ours/this: overhead per crash"])
    overhead = {n: [(f.wall - c.wall) / crashes for f, c in zip(faulty[n], clean[n])] for n in clean}
    data: dict[str, object] = {"steps": steps, "checkpoint_interval": interval, "crashes": crashes}
    for n, _, _ in VARIANTS:
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
    table.notes.append(f"{reps} pairs; the faults are SIGKILLs of a random rank at the same step thresholds for every "
                       f"launcher of a pair (the first at a checkpointed step). torchrun tuned: --monitor-interval 0.001, "
                       f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; it runs the same job, just-in-time saves included.")
    return Result(NAME, [table], data)
