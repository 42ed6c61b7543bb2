"""8. Checkpoint stall: how long a training step is blocked per checkpoint, for 10M and 100M parameters.

The training job (2 ranks, no simulated compute, batch 8) with the MLP widened to the target
size saves every C steps: rank 0 gathers every rank's RNG state, writes model + momentum
(8 bytes a parameter) to a temporary, fsyncs, renames, fsyncs the directory, prunes old
checkpoints (verifying the ones it keeps), and all ranks wait at a barrier. Per checkpoint,
stall = the gap from the checkpointed step to the next − the median gap between steps with no
checkpoint (step times: the first rank to report each step, on the worker's own clock). Also
reported: the save itself (rank 0's ``checkpoint_saved`` seconds), the file size, and what one
CRC verification of the file costs (timed here, on the warm page cache, as the prune sees it):
the prune verifies each of the ``keep`` (3) newest files on every save, so the first save of a
run verifies one file and every save from the third on verifies three.

The stall is the training script's, not the launcher's (neither launcher touches a checkpoint
while the job runs), so this runs under our daemon only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from supervisord_ft.checkpoints import verify

from .launch import Launch, Ours
from .report import Result, Summary, Table
from .workloads import TrainJob

NAME = "checkpoint_stall"
WORKERS = 2
TIMEOUT = 600.0


@dataclass(frozen=True)
class Size:
    label: str
    hidden: int  # Linear(h, h) dominates: about h² parameters
    steps: int
    interval: int

    @property
    def job(self) -> TrainJob:
        return TrainJob(steps=self.steps, checkpoint_interval=self.interval, step_time=0.0, hidden=self.hidden,
                        batch_size=8)


async def stalls(size: Size) -> dict[str, object]:
    job = size.job
    async with Launch(Ours(), job, WORKERS) as run:
        if await run.wait_exit(TIMEOUT) != 0:
            raise RuntimeError(f"exit {run.returncode}\n{run.stderr_tail()}")
        newest = max(run.checkpoint_dir.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        file_mib = newest.stat().st_size / 2**20
        started = time.perf_counter()
        verify(newest)
        verify_s = time.perf_counter() - started
    at: dict[int, float] = {}
    for r in run.named("step"):
        at[r.fields["step"]] = min(at.get(r.fields["step"], r.time), r.time)
    gaps = {s: at[s + 1] - at[s] for s in range(2, job.steps)}  # from step 2: step 1 → 2 still warms up
    plain = statistics.median(g for s, g in gaps.items() if s % job.checkpoint_interval)
    return {"parameters": job.parameters, "file_mib": file_mib, "step_s": plain, "verify_s": verify_s,
            "stall_s": [g - plain for s, g in gaps.items() if s % job.checkpoint_interval == 0],
            "save_s": [r.fields["seconds"] for r in run.named("checkpoint_saved")]}


async def run(quick: bool) -> Result:
    sizes = (Size("1M", 1000, 16, 5),) if quick else (Size("10M", 3153, 31, 5), Size("100M", 9990, 13, 3))
    table = Table("Checkpoint stall (s): time a step is blocked per checkpoint",
                  ["model", "parameters", "file MiB", "plain step", "stall, 1st save", "stall, 3rd save on",
                   "save (rank 0), 3rd on", "CRC-verify one file"])
    data: dict[str, object] = {}
    for size in sizes:
        m = await stalls(size)
        first, steady = m["stall_s"][0], Summary.of(m["stall_s"][2:])
        save = Summary.of(m["save_s"][2:])
        table.add(size.label, f"{m['parameters']:,}", f"{m['file_mib']:.0f}", f"{m['step_s']:.3f}", f"{first:.3f}",
                  steady.fmt(), save.fmt(), f"{m['verify_s']:.3f}")
        data[size.label] = {**m, "stall_first_s": first, "stall_steady_s": steady, "save_steady_s": save}
    table.notes.append("One run per size; 'from the 3rd save on' summarises every later checkpoint of the run but the "
                       "last step's (no step follows it).")
    return Result(NAME, [table], data)
