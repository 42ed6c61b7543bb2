"""10. What warm recovery costs while nothing fails: memory, CPU and training throughput.

The training job (2 ranks, ~12 ms steps) runs with the defaults (a warm standby per rank, the
store host) and with both off (``ours cold``), one after the other, ``reps`` times. The window
opens once every standby is idle (in the cold run: at the same offset from its launch) and
lasts W seconds. In it: the training's steps/s (the highest step completed by its end minus by
its start), the CPU the standbys and the store host used, and at its end each one's resident
memory (VmRSS). Also: the time from launch to the first step, which the pool's imports share
two cores with.
"""

from __future__ import annotations

import time

from supervisord_ft import procfs

from .launch import OURS_COLD, BenchError, Launch, Ours, Runner, cpu_seconds
from .report import Result, Summary, Table, ratios
from .workloads import TrainJob

NAME = "standby_cost"
WORKERS = 2
JOB = TrainJob(checkpoint_interval=100)
TIMEOUT = 120.0


def highest_step(run: Launch, by: float) -> int:
    return max((r.fields["step"] for r in run.named("step") if r.time <= by), default=0)


def helpers(run: Launch) -> list[int]:
    """The idle standbys' pids, then the store host's."""
    gone = {r.fields["standby_pid"] for r in run.named("standby_state") if r.fields["to"] in ("dead", "handed_out")}
    idle = {r.fields["standby_pid"] for r in run.named("standby_state", to="idle")} - gone
    return sorted(idle) + [r.fields["pid"] for r in run.named("store_host_started")]


async def measure(runner: Runner, window: float, opens_at: float | None) -> dict[str, object]:
    """``opens_at``: seconds after launch; None: once the pool is ready."""
    async with Launch(runner, JOB, WORKERS) as run:
        first = await run.wait_for(lambda r: r.event == "step", TIMEOUT, "the first step")
        if opens_at is None:
            await run.wait_for(lambda r: len(run.named("standby_state", to="idle")) >= WORKERS,
                               TIMEOUT, "a ready standby pool")
            opens_at = time.time() - run.started
        async for _ in run.follow(until=run.started + opens_at):
            pass
        begin, pids = time.time(), helpers(run)
        if runner is not OURS_COLD and len(pids) != WORKERS + 1:
            raise BenchError(f"expected {WORKERS} idle standbys and a store host, found pids {pids}")
        cpu = [cpu_seconds(p) or 0.0 for p in pids]
        async for _ in run.follow(until=begin + window):
            pass
        end = time.time()
        cpu = [(cpu_seconds(p) or 0.0) - c for p, c in zip(pids, cpu)]
        rss = [int((procfs.status_field(p, "VmRSS") or "0 kB").split()[0]) / 1024 for p in pids]
    return {"opens_at_s": opens_at, "first_step_s": first.time - run.started,
            "steps_per_s": (highest_step(run, end) - highest_step(run, begin)) / (end - begin),
            "helper_cpu_s": sum(cpu), "helper_rss_mib": rss}


async def run(quick: bool) -> Result:
    reps, window = (1, 5.0) if quick else (3, 30.0)
    warm, cold = [], []
    for _ in range(reps):
        warm.append(await measure(Ours(), window, None))
        cold.append(await measure(OURS_COLD, window, warm[-1]["opens_at_s"]))
    table = Table(f"Warm recovery's cost while nothing fails ({WORKERS} ranks, a {window:g} s window once the pool is idle)",
                  ["launcher", "steps/s", "steps/s ours/cold (per pair)", "launch → first step s",
                   "standby RSS MiB each", "store host RSS MiB", "standbys + store host CPU s in window"])
    data: dict[str, object] = {"window_s": window}
    for name, runs in (("ours", warm), ("ours cold", cold)):
        rate = Summary.of([r["steps_per_s"] for r in runs])
        ratio = ratios([r["steps_per_s"] for r in warm], [r["steps_per_s"] for r in cold]) if name == "ours" else None
        standby_rss = Summary.of([m for r in runs for m in r["helper_rss_mib"][:-1]]) if name == "ours" else None
        host_rss = Summary.of([r["helper_rss_mib"][-1] for r in runs]) if name == "ours" else None
        table.add(name, rate.fmt(digits=1), ratio.fmt() if ratio else "",
                  Summary.of([r["first_step_s"] for r in runs]).fmt(),
                  standby_rss.fmt(digits=0) if standby_rss else "", host_rss.fmt(digits=0) if host_rss else "",
                  Summary.of([r["helper_cpu_s"] for r in runs]).fmt() if name == "ours" else "")
        data[name] = {"steps_per_s": rate, "ratio_ours_over_cold": ratio, "runs": runs}
    table.notes.append(f"{reps} run(s) per launcher, alternating. RSS: resident memory at the window's end "
                       "(the standbys' torch pages are private to each: no fork server shares them). Launch → first "
                       "step: the store host imports torch beside the first launch's ranks; the pool starts after.")
    return Result(NAME, [table], data)
