"""15. Jobs we did not write, with no configuration: a Lightning job, an HF accelerate job (a tiny
GPT-2), and a plain DDP script that crashes 1 s into training.

Both print only what the bench reads (``bench/jobs/``: a ``tick`` per step with the worker's wall
clock, the injected crash's time), nothing of the daemon's conventions. Recovery = the first tick
after the relaunch − the crash. Ours runs with its defaults: the standbys learn what the job
imports (Lightning, 2690 modules) and, where the daemon may lower and restore a standby's
priority, start with the first launch at SCHED_IDLE; a rank that raised leaves once its
``atexit`` handlers have run (``fast_failed_exit``). The Lightning and accelerate jobs crash 12 s into
training (its pool, learnt, is ready by then); the DDP script 1 s in, while ours' pool may
still be importing torch beside the starting ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .launch import TORCHRUN_TUNED, BenchError, Launch, Ours, Runner
from .report import Result, Table, row
from .workloads import ForeignJob

NAME = "frameworks"
JOBS = {"Lightning, crash 12 s in": ForeignJob("lightning_ticks.py", ("--crash-at", "400", "--step-time", "0.03")),
        "HF accelerate, crash 12 s in": ForeignJob("accelerate_ticks.py", ("--crash-at", "300", "--step-time", "0.03")),
        "plain DDP, crash 1 s in": ForeignJob("ddp_ticks.py", ("--crash-at", "50", "--step-time", "0.02"))}
WORKERS = 2
TIMEOUT = 120.0


@dataclass(frozen=True)
class Sample:
    seconds: float  # nan: no tick after the relaunch within TIMEOUT
    warm: int  # ours: ranks of the relaunch that ran in a standby


async def measure(runner: Runner, job: ForeignJob) -> Sample:
    async with Launch(runner, job, WORKERS, max_restarts=3) as run:
        crash = (await run.wait_for(lambda r: r.event == "crash", TIMEOUT, "the injected crash")).time
        try:
            resumed = await run.wait_for(lambda r: r.event == "tick" and r.fields.get("restart", 0) >= 1,
                                         TIMEOUT, "a step after the relaunch")
        except BenchError:
            if isinstance(runner, Ours):
                raise
            return Sample(math.nan, 0)
        return Sample(resumed.time - crash, len(run.named("standby_state", to="handed_out")))


async def run(quick: bool) -> Result:
    runners: tuple[Runner, ...] = (Ours(), TORCHRUN_TUNED)
    pairs = 1 if quick else 3
    samples = {(job, r.name): [] for job in JOBS for r in runners}
    for _ in range(pairs):
        for job, spec in JOBS.items():
            for runner in runners:  # alternating: each torchrun run right after an ours run
                samples[job, runner.name].append(await measure(runner, spec))
    table = Table("Recovery of jobs we did not write (s): crash → first step after the relaunch",
                  ["job", "launcher", "recovery, median [min–max]", "ours/torchrun (per pair)", "warm ranks"])
    data: dict[str, object] = {}
    for job in JOBS:
        ours = [s.seconds for s in samples[job, "ours"]]
        for runner in runners:
            runs = samples[job, runner.name]
            total, ratio = row(ours, [s.seconds for s in runs], runner.name == "ours")
            table.add(job, runner.name, total.fmt(), ratio.fmt() if ratio else "",
                      f"{sum(s.warm for s in runs)} of {WORKERS * len(runs)}" if runner.name == "ours" else "")
            data[f"{job}/{runner.name}"] = {"recovery_s": total, "ratio_ours_over": ratio,
                                            "samples": [s.seconds for s in runs],
                                            "warm_ranks": [s.warm for s in runs]}
    table.notes.append(f"{WORKERS} ranks; {pairs} pairs per job; ours: its defaults, no preload set; torchrun "
                       "tuned: --monitor-interval 0.001 and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.")
    return Result(NAME, [table], data)
