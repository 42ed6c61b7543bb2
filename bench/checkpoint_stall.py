"""8. Checkpoint stall: how long a training step is blocked per checkpoint, for 10M and 100M parameters.

The training job (2 ranks, no simulated compute, batch 8) with the MLP widened to the target
size saves every C steps. Rank 0 snapshots model + momentum (8 bytes a parameter) into tensors
reused from save to save (``copy_``), then a background thread writes it to a temporary, fsyncs,
renames, fsyncs the directory and prunes old checkpoints; ``sync`` (``--no-async_checkpoint``)
waits for that write before the next step, as every save did before. Per checkpoint, stall = the
gap from the checkpointed step to the next − the median gap between steps with no checkpoint
(step times: the first rank to report each step, on the worker's own clock). Measured in the
same runs: the snapshot itself (rank 0's ``checkpoint_started`` ``snapshot_seconds``: copying the
state into the warm buffer), the background write (``checkpoint_saved`` seconds), the file size.

Overhead: the mean step time over a run saving every 10 steps (asynchronously) against the same
run with no save but the last one, the two alternating, with 2 ranks (every core training: the
writer's CPU comes out of the steps) and with 1 rank (a core left for the writer, as on a GPU
node, where the ranks' own CPU use is small).

The stall is the training script's, not the launcher's (neither launcher touches a checkpoint
while the job runs), so this runs under our daemon only.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .launch import Launch, Ours
from .report import Result, Summary, Table
from .workloads import TrainJob

NAME = "checkpoint_stall"
WORKERS = 2
TIMEOUT = 600.0
OVERHEAD_INTERVAL = 10
NEVER = 10**9  # a checkpoint interval no run reaches


@dataclass(frozen=True)
class Size:
    label: str
    hidden: int  # Linear(h, h) dominates: about h² parameters
    steps: int
    interval: int
    overhead_steps: int

    def job(self, steps: int, interval: int, async_checkpoint: bool = True) -> TrainJob:
        return TrainJob(steps=steps, checkpoint_interval=interval, step_time=0.0, hidden=self.hidden,
                        batch_size=8, async_checkpoint=async_checkpoint)


async def step_times(job: TrainJob, workers: int = WORKERS) -> tuple[dict[int, float], Launch, float]:
    """Each step's completion (the first rank to report it), the finished run, its file's MiB."""
    async with Launch(Ours(), job, workers) as run:
        if await run.wait_exit(TIMEOUT) != 0:
            raise RuntimeError(f"exit {run.returncode}\n{run.stderr_tail()}")
        newest = max(run.checkpoint_dir.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        file_mib = newest.stat().st_size / 2**20
    at: dict[int, float] = {}
    for r in run.named("step"):
        at[r.fields["step"]] = min(at.get(r.fields["step"], r.time), r.time)
    return at, run, file_mib


async def stalls(size: Size, async_checkpoint: bool) -> dict[str, object]:
    job = size.job(size.steps, size.interval, async_checkpoint)
    at, run, file_mib = await step_times(job)
    gaps = {s: at[s + 1] - at[s] for s in range(2, job.steps)}  # from step 2: step 1 → 2 still warms up
    plain = statistics.median(g for s, g in gaps.items() if s % job.checkpoint_interval)
    return {"parameters": job.parameters, "file_mib": file_mib, "step_s": plain,
            "stall_s": [g - plain for s, g in gaps.items() if s % job.checkpoint_interval == 0],
            "snapshot_s": [r.fields["snapshot_seconds"] for r in run.named("checkpoint_started")],
            "save_s": [r.fields["seconds"] for r in run.named("checkpoint_saved")]}


async def overhead(size: Size, workers: int, reps: int) -> dict[str, object]:
    """Mean step time over steps 2..N-1 (the last step's save excluded) with and without saves,
    ``reps`` runs of each, alternating; the overhead per pair."""
    means: dict[str, list[float]] = {"no_saves_step_s": [], "saving_step_s": []}
    for _ in range(reps):
        for key, interval in (("no_saves_step_s", NEVER), ("saving_step_s", OVERHEAD_INTERVAL)):
            at, _, _ = await step_times(size.job(size.overhead_steps, interval), workers)
            means[key].append((at[size.overhead_steps - 1] - at[2]) / (size.overhead_steps - 3))
    return {**{k: Summary.of(v) for k, v in means.items()},
            "overhead": Summary.of([b / a - 1 for a, b in zip(means["no_saves_step_s"], means["saving_step_s"])])}


async def run(quick: bool) -> Result:
    sizes = ((Size("1M", 1000, 16, 5, 23),) if quick else
             (Size("10M", 3153, 31, 5, 43), Size("100M", 9990, 21, 5, 23)))
    table = Table("Checkpoint stall (s): time a step is blocked per checkpoint, against copying the state",
                  ["model", "parameters", "file MiB", "save", "plain step", "stall, 1st save",
                   "stall, 3rd save on", "snapshot (warm copy), 3rd on", "stall / snapshot",
                   "write (rank 0), 3rd on"])
    costs = Table(f"Training overhead of an asynchronous save every {OVERHEAD_INTERVAL} steps",
                  ["model", "ranks on 2 cores", "runs", "step s, no saves", f"step s, a save every {OVERHEAD_INTERVAL}",
                   "overhead (per pair)"])
    data: dict[str, object] = {}
    for size in sizes:
        data[size.label] = {}
        for mode, is_async in (("async", True), ("sync", False)):
            m = await stalls(size, is_async)
            first, steady = m["stall_s"][0], Summary.of(m["stall_s"][2:])
            snap, save = Summary.of(m["snapshot_s"][2:]), Summary.of(m["save_s"][2:])
            ratio = steady.median / snap.median if snap.median > 0 else float("nan")
            table.add(size.label, f"{m['parameters']:,}", f"{m['file_mib']:.0f}", mode, f"{m['step_s']:.3f}",
                      f"{first:.3f}", steady.fmt(), snap.fmt(), f"{ratio:.2f}", save.fmt())
            data[size.label][mode] = {**m, "stall_first_s": first, "stall_steady_s": steady,
                                      "snapshot_steady_s": snap, "save_steady_s": save, "stall_per_snapshot": ratio}
        for workers in (2, 1):
            reps = 1 if quick or size.label == "100M" else 3
            o = await overhead(size, workers, reps)
            costs.add(size.label, workers, reps, o["no_saves_step_s"].fmt(digits=4), o["saving_step_s"].fmt(digits=4),
                      f"{o['overhead'].median:+.2%} [{o['overhead'].min:+.2%} – {o['overhead'].max:+.2%}]")
            data[size.label][f"overhead_{workers}_ranks"] = o
    table.notes.append("One run per size and mode; 'from the 3rd save on' summarises every later checkpoint of the run "
                       "but the last step's (no step follows it).")
    return Result(NAME, [table, costs], data)
