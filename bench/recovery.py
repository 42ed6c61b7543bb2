"""2. Recovery time: a worker crash → the first completed training step after the group resumes.

The training job (2 or 4 ranks, ~12 ms steps, a checkpoint every 20 steps) crashes rank 1 after
step 610 on its first attempt (``--crash_at_step``; late enough that the standby pool of "ours
warm" is ready by then); the launcher relaunches the group, which resumes from rank 0's
just-in-time checkpoint of step 610 (from step 600 with ``--no-jit_checkpoint``). Recovery = the
first resumed step's completion − the crash, both read from the workers' own wall clocks, so the number means the same for both launchers. The run is
stopped once every rank of the resumed group reported its first step.

The breakdown is measured the same way for both launchers:

- old group gone: crash → the last rank of the crashed attempt exited (pidfd): detection + teardown;
- relaunch: → the first new worker process started (its kernel start time): checkpoint selection,
  torchrun's rendezvous round, spawning;
- interpreter, import, load, rendezvous, first step: the ranks' own ``startup_timings`` (median
  over ranks). ``load`` is argument parsing, model construction and the checkpoint load.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass, field

from .launch import (OURS_COLD, TORCHRUN_DEFAULT, TORCHRUN_TUNED, BenchError, Launch, Ours, Record, Runner,
                     watch_exit)
from .report import Result, Summary, Table, row
from .workloads import TrainJob

NAME = "recovery"
JOB = TrainJob(checkpoint_interval=20, crash_at_step=610, crash_rank=1)
PHASES = ("interpreter", "import", "load", "rendezvous", "first_step")
STAGES = ("old_group_gone", "relaunch", *PHASES)
TIMEOUT = 120.0
# A torchrun default restart that hits the stale-store race (see launch.Torchrun) costs its 30 s
# shutdown timeout and another attempt; a run that has not resumed by then counts as not recovered.
RESUME_TIMEOUT = 120.0


def first_step_at(timings: Record) -> float:
    """When this rank finished its first step: its process start plus its start-up phases."""
    return timings.fields["process_start"] + sum(timings.fields[f"{p}_s"] for p in PHASES)


@dataclass(frozen=True)
class Recovery:
    seconds: float  # nan: the group did not resume within RESUME_TIMEOUT
    stages: dict[str, float] = field(default_factory=dict)  # STAGES, in seconds
    failed_restarts: int = 0  # relaunched groups that died before their first step
    daemon: dict[str, float] = field(default_factory=dict)  # ours: detection and teardown, from its events
    warm_ranks: int = 0  # ours: resumed ranks that ran in a standby

    @property
    def recovered(self) -> bool:
        return not math.isnan(self.seconds)


async def resumed_group(run: Launch, workers: int) -> list[Record] | None:
    """The ``startup_timings`` of every rank of the first relaunched group that made a step."""
    by_attempt: dict[int, dict[int, Record]] = {}
    async for r in run.follow(until=time.time() + RESUME_TIMEOUT):
        if r.event == "startup_timings" and r.fields["attempt"] >= 1:
            group = by_attempt.setdefault(r.fields["attempt"], {})
            group[r.fields["rank"]] = r
            if len(group) == workers:
                return list(group.values())
    return None


async def measure(runner: Runner, workers: int) -> Recovery:
    async with Launch(runner, JOB, workers, max_restarts=5) as run:
        first = [await run.wait_for(lambda r, k=k: r.event == "startup_timings" and r.fields["rank"] == k,
                                    TIMEOUT, f"rank {k}'s first step") for k in range(workers)]
        old = [watch_exit(r.fields["pid"]) for r in first]
        crash = (await run.wait_for(lambda r: r.event == "injected_crash", TIMEOUT, "the injected crash")).time
        resumed = await resumed_group(run, workers)
        if resumed is None:
            if isinstance(run.runner, Ours):  # ours must always recover: anything else is a bug to see
                raise BenchError(f"ours: no resumed group within {RESUME_TIMEOUT:g} s\n{run.stderr_tail()}")
            return Recovery(math.nan)
        gone = max(await asyncio.gather(*old))
    started = min(r.fields["process_start"] for r in resumed)
    stages = {"old_group_gone": gone - crash, "relaunch": started - gone}
    stages |= {p: statistics.median(r.fields[f"{p}_s"] for r in resumed) for p in PHASES}
    daemon = {}
    if exited := run.named("worker_exited", rank=JOB.crash_rank, restart=0):
        daemon["detection"] = exited[0].time - crash
    if teardown := run.named("teardown", why="recovery"):
        daemon["teardown"] = teardown[0].fields["seconds"]
    warm = len(run.named("standby_state", to="handed_out"))
    return Recovery(min(map(first_step_at, resumed)) - crash, stages, resumed[0].fields["attempt"] - 1, daemon, warm)


async def run(quick: bool) -> Result:
    # torchrun default is left out of the quick run: its failed restarts cost 30 s or more each.
    runners: tuple[Runner, ...] = (Ours(), OURS_COLD, TORCHRUN_TUNED) if quick else (
        Ours(), OURS_COLD, TORCHRUN_DEFAULT, TORCHRUN_TUNED)
    reps, sizes = (1, (2,)) if quick else (3, (2, 4))
    samples: dict[tuple[int, str], list[Recovery]] = {(n, r.name): [] for n in sizes for r in runners}
    for _ in range(reps):
        for n in sizes:
            for runner in runners:  # alternating, so each torchrun run sits next to an ours run
                samples[n, runner.name].append(await measure(runner, n))

    main = Table("Recovery time (s): crash → first completed step after resume",
                 ["workers", "launcher", "recovery, median [min–max]", "ours/this (per pair)", "warm ranks",
                  "failed restarts",
                  f"not resumed in {RESUME_TIMEOUT:g} s"])
    parts = Table("Where recovery time goes (s, medians)", ["workers", "launcher", *STAGES, "total"])
    data: dict[str, object] = {}
    for n in sizes:
        ours = [s.seconds for s in samples[n, "ours"]]
        for runner in runners:
            runs = samples[n, runner.name]
            total, ratio = row(ours, [s.seconds for s in runs], runner.name == "ours")
            lost = sum(not s.recovered for s in runs)
            main.add(n, runner.name, total.fmt(), ratio.fmt() if ratio else "",
                     f"{sum(s.warm_ranks for s in runs)} of {n * len(runs)}", sum(s.failed_restarts for s in runs),
                     f"{lost} of {len(runs)}")
            runs = [s for s in runs if s.recovered]
            stages = {k: Summary.of([s.stages[k] for s in runs]) for k in STAGES}
            parts.add(n, runner.name, *(f"{stages[k].median:.3f}" for k in STAGES), f"{total.median:.3f}")
            data[f"{n}_workers/{runner.name}"] = {
                "recovery_s": total, "ratio_ours_over": ratio, "stages_s": stages, "not_resumed": lost,
                "failed_restarts": sum(s.failed_restarts for s in runs), "warm_ranks": sum(s.warm_ranks for s in runs),
                "daemon_s": {k: Summary.of([s.daemon[k] for s in runs if k in s.daemon]) for k in ("detection", "teardown")},
                "samples": [{"seconds": s.seconds, "stages": s.stages, "failed_restarts": s.failed_restarts,
                             "daemon": s.daemon} for s in runs],
            }
    main.notes.append("ours: the defaults (warm standby ranks, a store up before the ranks); ours cold: "
                      "--no-standby --no-store-host; "
                      "warm ranks: resumed ranks that ran in a standby. "
                      f"torchrun default: --monitor-interval 0.1, shared rendezvous store; tuned: "
                      f"--monitor-interval 0.001 and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. {reps} runs per cell. "
                      "failed restarts: relaunched groups that died before a step (torchrun's stale-store race).")
    parts.notes.append("old_group_gone = detection + teardown (crash → last old rank exited); relaunch = → first new "
                       "process started (kernel start times have 10 ms resolution, hence ~0 or slightly negative); "
                       "the rest are the new ranks' own start-up phases. Stage medians need not add up to the "
                       "total's median.")
    for n, runner in ((n, r) for n in sizes for r in runners if isinstance(r, Ours)):
        ours_runs = samples[n, runner.name]
        d = {k: Summary.of([s.daemon[k] for s in ours_runs if k in s.daemon]).median for k in ("detection", "teardown")}
        parts.notes.append(f"{runner.name}, {n} workers, from its own events: exit → worker_exited {d['detection'] * 1e3:.1f} ms; "
                           f"teardown (SIGTERM → survivors reaped) {d['teardown']:.3f} s.")
    return Result(NAME, [main, parts], data)
