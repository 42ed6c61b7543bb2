"""13. Failures explained and acted on by their cause, against torchrun on the same jobs.

- A deterministic bug: ``tests/jobs/ddp_faults.py`` (plain DDP, its own checkpoints every 50
  steps), rank 1 raises ``ValueError`` in ``load_batch`` at step 150 on every attempt. Both
  launchers get ``--max-restarts 10`` (ours also ``--restart-window 5``, which gives the budget
  back); metric: attempts launched and wall seconds until the launcher gives up, and what it
  says. torchrun's attempts are counted from its agent's "attempts left; will restart worker
  group" lines (``LOGLEVEL=INFO``); it
  runs tuned (a fresh store per round: with the shared one its restarted gloo ranks hang in
  ``init_process_group``, see ``launch.Torchrun``).
- A knock-on first: rank 1 tears its process group down, waits 4 s, raises; rank 0 dies first,
  of the lost peer (its 1 s collective timeout). Metric: the rank each launcher names as the
  root cause (torchrun's "Root Cause (first observed failure)", our ``failure_explained``), and
  what waiting for the root cost ours (``root_cause_wait``).
- The cost of a cause: ``causes.of_rank`` on a rank's stderr tail (a real 20-frame traceback,
  and the worst case, 64 KiB of a 10,000-frame one), in this process, per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from pathlib import Path

from supervisord_ft import causes
from supervisord_ft.attempt import Tail

from .launch import ROOT, TORCHRUN_TUNED, descendants, job_env, kill_group, run_daemon
from .report import Result, Summary, Table
from .workloads import PYTHON

NAME = "failures"
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))
JOB = ROOT / "tests" / "jobs" / "ddp_faults.py"
BUG = ["--save-every", "50", "--raise-rank", "1", "--raise-step", "150"]
KNOCK_ON = ["--steps", "60", "--save-every", "20", "--raise-rank", "1", "--raise-step", "30",
            "--knock-on", "--knock-on-delay", "4", "--pg-timeout", "1"]
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):\s*\[\d+\]:.*?rank\s*:\s*(\d+)", re.S)


async def torchrun(max_restarts: int, job: list[str], timeout: float) -> dict[str, object]:
    """torchrun --standalone on ``job``: its exit code, attempts, wall seconds, the root it names."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", str(max_restarts), str(JOB), *job,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=job_env({**TORCHRUN_TUNED.env, "LOGLEVEL": "INFO"}), cwd=ROOT,
        start_new_session=True)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        for pid in descendants(proc.pid):  # its ranks run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kill_group(proc)
        await proc.wait()
    text = err.decode(errors="replace")
    root = ROOT_CAUSE.search(text)
    return {"exit": proc.returncode, "seconds": time.monotonic() - t0,
            "attempts": text.count("attempts left; will restart worker group") + 1,
            "root_rank": int(root[1]) if root else None}


async def ours(args: list[str], job: list[str], timeout: float) -> dict[str, object]:
    t0 = time.monotonic()
    evs = await run_daemon(["--num-workers", "2", "--grace-period", "2", "--restart-backoff", "0", *args],
                           job, timeout, script=JOB)
    seconds = time.monotonic() - t0
    end = next((e for e in reversed(evs) if e["event"] == "supervisor_exit"), {})
    failed = [e for e in evs if e["event"] == "state_changed" and e.get("to") == "FAILED"]
    explained = [e for e in evs if e["event"] == "failure_explained"]
    waits = [e["seconds"] for e in evs if e["event"] == "root_cause_wait"]
    return {"exit": end.get("exit_code"), "seconds": seconds,
            "attempts": sum(e["event"] == "launching" for e in evs),
            "reason": failed[0]["reason"] if failed else end.get("state"),
            "root_rank": explained[0]["rank"] if explained else None,
            "root": f"{explained[0]['exception']} at {explained[0]['where']}" if explained else None,
            "knock_on": explained[0]["knock_on"] if explained else None,
            "root_cause_wait_s": waits[0] if waits else None}


def cause_cost(frames: int, reps: int) -> Summary:
    tail = Tail()
    tail.add(b"Traceback (most recent call last):")
    for i in range(frames):
        tail.add(f'[rank1]:   File "/home/u/train/job.py", line {i + 1}, in f{i}'.encode())
        tail.add(f"[rank1]:     f{i + 1}(batch)".encode())
    tail.add(b"[rank1]: ValueError: no batch 150")
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        causes.of_rank(1, 1, tail.text(), causes.ErrorFile(None, None), False, 0.0)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Summary.of(samples, p99=True)


async def run(quick: bool) -> Result:
    restarts = 3 if quick else 10
    steps = ["--steps", "400"]
    o = await ours(["--max-restarts", str(restarts), "--restart-window", "5"], [*steps, *BUG], 600)
    t = await torchrun(restarts, [*steps, *BUG], 900)
    t1 = Table(f"A bug at step 150 of every attempt (2 ranks, checkpoints every 50), --max-restarts {restarts}",
               ["launcher", "attempts", "wall s", "ours / torchrun", "exit", "says"])
    t1.add("ours (--restart-window 5)", o["attempts"], f"{o['seconds']:.1f}",
           f"**{o['seconds'] / t['seconds']:.3f}**", o["exit"], o["reason"])
    t1.add("torchrun --standalone", t["attempts"], f"{t['seconds']:.1f}", "1", t["exit"],
           f"root cause rank {t['root_rank']} (exit 1), after every restart was spent")
    ko = await ours(["--max-restarts", "0", "--store-host"], KNOCK_ON, 300)
    kt = await torchrun(0, KNOCK_ON, 300)
    t2 = Table("Rank 1 tears its group down, waits 4 s, raises; rank 0 dies first, of the lost peer",
               ["launcher", "root cause named", "what", "knock-ons", "waited for the root s"])
    t2.add("ours", f"rank {ko['root_rank']}", ko["root"], ko["knock_on"],
           "—" if ko["root_cause_wait_s"] is None else f"{ko['root_cause_wait_s']:.2f}")
    t2.add("torchrun", f"rank {kt['root_rank']}", "first observed failure (exit 1)", "—", "—")
    reps = 50 if quick else 500
    small, worst = cause_cost(20, reps), cause_cost(10_000, reps)
    t3 = Table(f"The cost of a rank's cause (causes.of_rank on its stderr tail, {reps} calls each)",
               ["stderr tail", "ms p50 [min–max]", "ms p99"])
    t3.add("a 20-frame traceback (torch's [rank1]: prefix)", small.fmt(digits=3), f"{small.p99:.3f}")
    t3.add("64 KiB kept of a 10,000-frame traceback", worst.fmt(digits=2), f"{worst.p99:.2f}")
    return Result(NAME, [t1, t2, t3], {"bug": {"ours": o, "torchrun": t}, "knock_on": {"ours": ko, "torchrun": kt},
                                       "cause_ms": {"20_frames": small, "10000_frames": worst}})
