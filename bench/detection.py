"""1. Failure detection latency: a worker's exit → the launcher acting on it.

A light (torch-free) rank exits 1 on every attempt, 0.2–0.4 s after it starts (random, so
the exit never locks onto a polling phase), printing its wall-clock time just before
``os._exit``. Both launchers relaunch the group each time, so one run yields many exits. Per exit:

- event (ours only): → the daemon's ``worker_exited`` event (its timestamp).
- signal (both): → the surviving rank's SIGTERM handler runs and prints its time, i.e. the
  launcher noticed the exit and began the teardown. torchrun gives no other machine-readable sign.
"""

from __future__ import annotations

from .launch import COLD, Launch, Ours, Runner, Torchrun
from .report import Result, Summary, Table, ratios
from .workloads import LightJob

NAME = "detection"
# The same exit on every attempt, without progress, is a deterministic failure that ours ends after
# two attempts; 0 turns that rule off (torchrun's behaviour), so every attempt yields an exit.
OURS = Ours(options=(*COLD, "--max-stalled-attempts", "0"))
JOB = LightJob(("--exit-rank", "1", "--exit-after", "0.2", "--exit-jitter", "0.2"))
TORCHRUNS = (Torchrun(0.1, label="torchrun 0.1 s (default)"), Torchrun(0.01, label="torchrun 0.01 s"),
             Torchrun(0.001, label="torchrun 0.001 s"))
TIMEOUT = 300.0


async def latencies(runner: Runner, exits: int) -> tuple[list[float], list[float]]:
    """(event latencies, signal latencies) in ms for ``exits`` exits of rank 1."""
    async with Launch(runner, JOB, workers=2, max_restarts=exits - 1) as run:
        await run.wait_exit(TIMEOUT)
    exited = {r.fields["attempt"]: r.time for r in run.named("exiting")}
    signal = [(r.time - exited[r.fields["attempt"]]) * 1e3 for r in run.named("sigterm") if r.fields["attempt"] in exited]
    event = [(r.time - exited[r.fields["restart"]]) * 1e3 for r in run.named("worker_exited", rank=1)
             if r.fields["restart"] in exited]
    if len(signal) < exits * 0.9:
        raise RuntimeError(f"{runner.name}: only {len(signal)} of {exits} exits measured")
    return event, signal


async def run(quick: bool) -> Result:
    reps, ours_exits, their_exits = (1, 10, 6) if quick else (2, 30, 15)
    ours_event: list[float] = []
    ours_signal: list[list[float]] = []
    theirs: dict[str, list[list[float]]] = {t.name: [] for t in TORCHRUNS}
    for _ in range(reps):
        event, signal = await latencies(OURS, ours_exits)
        ours_event += event
        ours_signal.append(signal)
        for t in TORCHRUNS:
            theirs[t.name].append((await latencies(t, their_exits))[1])

    table = Table("Failure detection latency (ms): worker exit → launcher reacts",
                  ["launcher", "exits", "→ event, median [min–max]", "p99", "→ SIGTERM at survivor", "p99",
                   "ours/this (per-run medians)"])
    pooled = lambda runs: Summary.of([x for r in runs for x in r], p99=True)  # noqa: E731
    medians = lambda runs: [Summary.of(r).median for r in runs]  # noqa: E731
    ev, sg = Summary.of(ours_event, p99=True), pooled(ours_signal)
    table.add("ours", sg.n, ev.fmt(digits=2), f"{ev.p99:.2f}", sg.fmt(digits=2), f"{sg.p99:.2f}", "")
    data = {"ours": {"event_ms": ev, "signal_ms": sg, "samples_event_ms": ours_event, "samples_signal_ms": ours_signal}}
    for name, runs in theirs.items():
        s = pooled(runs)
        r = ratios(medians(ours_signal), medians(runs))
        table.add(name, s.n, "(no event)", "", s.fmt(digits=2), f"{s.p99:.2f}", r.fmt(digits=3))
        data[name] = {"signal_ms": s, "ratio_ours_over": r, "samples_signal_ms": runs}
    table.notes.append("One pair = one run of ours and one run of that torchrun, back to back; p99 pooled over all exits.")
    return Result(NAME, [table], data)
