"""5. Teardown time: a worker dies → every other rank of its group is gone.

Two cases, each with ``max_restarts 0`` so the launcher only tears down:

- blocked: the training job with 4 ranks (2 in quick mode); the bench SIGKILLs a random rank
  mid-training, so the survivors sit in an all-reduce with a dead peer. gloo notices the reset
  connection, so survivors also die on their own; the launcher races that.
- SIGTERM ignored: light workers that ignore SIGTERM; rank 0 exits 1. Only SIGKILL ends the
  survivors, after the launcher's grace period: ours ``--grace-period G``, torchrun
  ``--shutdown-timeout G``, run at an equal G and at each launcher's default (10 s vs 30 s).

Teardown = the victim's exit → the last survivor's exit, both observed through pidfds.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from .launch import COLD, TORCHRUN_DEFAULT, TORCHRUN_TUNED, Launch, Ours, Runner, Torchrun, watch_exit
from .report import Result, Summary, Table, ratios
from .workloads import Job, LightJob, TrainJob

NAME = "teardown"
TIMEOUT = 300.0
IGNORES_SIGTERM = LightJob(("--exit-rank", "0", "--exit-after", "0.5", "--ignore-sigterm"))


@dataclass(frozen=True)
class Case:
    label: str
    job: Job
    workers: int
    runners: tuple[Runner, ...]
    reps: int


async def teardown(runner: Runner, job: Job, workers: int, seed: int) -> float:
    """Seconds from the first rank's exit to the last one's."""
    async with Launch(runner, job, workers, max_restarts=0) as run:
        # The first line naming a rank's pid: the training job's startup_timings, the light worker's first step.
        ready = [await run.wait_for(lambda r, k=k: r.fields.get("rank") == k and "pid" in r.fields,
                                    TIMEOUT, f"rank {k} running") for k in range(workers)]
        exits = {r.fields["pid"]: watch_exit(r.fields["pid"]) for r in ready}
        if isinstance(job, TrainJob):
            await run.wait_for(lambda r: r.event == "step" and r.fields["step"] >= 20, TIMEOUT, "step 20")
            run.kill_worker(random.Random(seed))
        done, _ = await asyncio.wait(exits.values(), return_when=asyncio.FIRST_COMPLETED, timeout=TIMEOUT)
        first = min(f.result() for f in done)
        async with asyncio.timeout(TIMEOUT):
            last = max(await asyncio.gather(*exits.values()))
    return last - first


async def run(quick: bool) -> Result:
    reps, workers, grace = (1, 2, 1) if quick else (2, 4, 2)
    cases = [Case("survivors blocked in all-reduce, dead peer", TrainJob(), workers, (Ours(options=COLD), TORCHRUN_TUNED), reps),
             Case(f"survivors ignore SIGTERM, grace {grace:g} s both", IGNORES_SIGTERM, 4,
                  (Ours(float(grace), options=COLD), Torchrun(0.001, shutdown_timeout=grace, label=f"torchrun --shutdown-timeout {grace}")),
                  reps)]
    if not quick:
        cases.append(Case("survivors ignore SIGTERM, each launcher's default grace", IGNORES_SIGTERM, 4,
                          (Ours(options=COLD), TORCHRUN_DEFAULT), 1))
    table = Table("Teardown (s): first rank's exit → last rank's exit",
                  ["case", "ranks", "launcher", "teardown, median [min–max]", "ours/this (per pair)"])
    data: dict[str, object] = {}
    for case in cases:
        samples: dict[str, list[float]] = {r.name: [] for r in case.runners}
        for rep in range(case.reps):
            for runner in case.runners:
                samples[runner.name].append(await teardown(runner, case.job, case.workers, rep))
        ours = samples[case.runners[0].name]
        for runner in case.runners:
            s = Summary.of(samples[runner.name])
            ratio = ratios(ours, samples[runner.name]) if runner is not case.runners[0] else None
            table.add(case.label, case.workers, runner.name, s.fmt(), ratio.fmt() if ratio else "")
            data[f"{case.label}/{runner.name}"] = {"teardown_s": s, "ratio_ours_over": ratio,
                                                   "samples": samples[runner.name]}
    table.notes.append("Defaults: ours --grace-period 10, torchrun --shutdown-timeout 30. torchrun applies "
                       "--shutdown-timeout only when the agent itself stops: after a worker failure it stops the "
                       "group with _shutdown()'s own default of 30 s (torch 2.13, LocalElasticAgent._stop_workers).")
    return Result(NAME, [table], data)
