"""10. Multi-node on loopback: two nodes of one job, each a launcher of its own, one shared
checkpoint dir, the training job with one rank per node.

- Recovery after a rank crash (rank 1 after step 610, first attempt only): the crash → the first
  completed step after the whole job resumed, from the workers' own clocks, as in ``recovery``.
  Ours (two daemons, ``--nnodes 2``, their c10d rendezvous in a helper each, the news of the crash
  pushed through the store) against ``torchrun --nnodes 2 --rdzv-backend c10d`` (two agents, tuned
  as in ``recovery``: monitor interval 1 ms, a fresh store per round).
- Node loss, ours: node 1's daemon is SIGKILLed (its rank dies with it) and started again at
  once, as systemd, SLURM or Kubernetes would; the loss → the first completed step of the job
  running again on both nodes. The rendezvous drops the dead node after ``keep_alive_interval`` ×
  ``keep_alive_max_attempt`` without heartbeats: 1 s × 2 here (torch's default is 5 s × 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from .launch import BenchError, Launch, Ours, Record, Runner, Torchrun
from .recovery import first_step_at
from .report import Result, Summary, Table, ratios
from .workloads import TrainJob

NAME = "multinode"
NODES = 2
JOB = TrainJob(checkpoint_interval=20, crash_at_step=610, crash_rank=1)
LOSS_JOB = TrainJob(checkpoint_interval=20)
LOSS_AFTER_STEP = 300
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=2"
TIMEOUT = 120.0


def ours(node: int, endpoint: str, shared: Path) -> Runner:
    return Ours(name="ours", options=(
        "--nnodes", str(NODES), "--rdzv-endpoint", endpoint, "--rdzv-id", "bench",
        "--local-addr", "127.0.0.1", "--rdzv-conf", f"is_host={int(node == 0)},{RDZV_CONF}",
        "--checkpoint-dir", str(shared)))


def torchrun(node: int, endpoint: str, shared: Path) -> Runner:
    return Torchrun(0.001, share_store=False, label="torchrun tuned", rendezvous=(
        "--nnodes", str(NODES), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "--rdzv-id", "bench", "--local-addr", "127.0.0.1", "--rdzv-conf", f"is_host={int(node == 0)}"))


LAUNCHERS = {"ours": ours, "torchrun tuned": torchrun}


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def first(nodes: list[Launch], pred, what: str) -> Record:
    """The first record matching ``pred`` on any node."""
    waits = [asyncio.ensure_future(n.wait_for(pred, TIMEOUT, what)) for n in nodes]
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for w in waits:
            w.cancel()


async def resumed(nodes: list[Launch], after: float) -> list[Record]:
    """Every node's first ``startup_timings`` of a rank started after ``after``."""
    return [await n.wait_for(lambda r: r.event == "startup_timings" and r.fields["process_start"] > after,
                             TIMEOUT, "the resumed rank's first step") for n in nodes]


@contextlib.asynccontextmanager
async def job(make, job: TrainJob):
    endpoint = free_endpoint()
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as shared:
        async with contextlib.AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(Launch(make(n, endpoint, Path(shared)), job, 1,
                                                            max_restarts=5, checkpoint_dir=Path(shared)))
                     for n in range(NODES)]
            yield nodes, endpoint, Path(shared)


async def crash_recovery(make) -> float:
    async with job(make, JOB) as (nodes, _, _):
        for n in nodes:
            await n.wait_for(lambda r: r.event == "startup_timings", TIMEOUT, "the first step")
        crash = await first(nodes, lambda r: r.event == "injected_crash", "the injected crash")
        back = await resumed(nodes, crash.time)
        return min(map(first_step_at, back)) - crash.time


async def node_loss() -> float:
    async with job(ours, LOSS_JOB) as (nodes, endpoint, shared):
        for n in nodes:
            await n.wait_for(lambda r: r.event == "step" and r.fields["step"] >= LOSS_AFTER_STEP, TIMEOUT, "steps")
        lost_at = time.time()
        os.kill(nodes[1].pid, signal.SIGKILL)  # the daemon; its rank dies with it (parent-death signal)
        async with Launch(ours(1, endpoint, shared), LOSS_JOB, 1, max_restarts=5, checkpoint_dir=shared) as back:
            again = await resumed([nodes[0], back], lost_at)
            return min(map(first_step_at, again)) - lost_at


async def run(quick: bool) -> Result:
    reps = 1 if quick else 3
    samples: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
    losses: list[float] = []
    for _ in range(reps):
        for name, make in LAUNCHERS.items():  # alternating: each torchrun run next to an ours run
            try:
                samples[name].append(await crash_recovery(make))
            except BenchError:
                if name == "ours":
                    raise
                samples[name].append(math.nan)
        losses.append(await node_loss())
    main = Table(f"Multi-node recovery ({NODES} nodes on loopback, 1 rank each; s)",
                 ["what", "launcher", "median [min–max]", "ours/this (per pair)"])
    data: dict[str, object] = {}
    for name, values in samples.items():
        ratio = ratios(samples["ours"], values) if name != "ours" else None
        main.add("rank crash → first step after resume", name, Summary.of(values).fmt(),
                 ratio.fmt() if ratio else "")
        data[f"crash/{name}"] = {"recovery_s": Summary.of(values), "ratio_ours_over": ratio, "samples": values}
    main.add("node lost (daemon SIGKILLed, restarted) → first step", "ours", Summary.of(losses).fmt(), "")
    data["node_loss/ours"] = {"seconds": Summary.of(losses), "samples": losses}
    main.notes.append(f"{reps} runs per cell. ours: --nnodes 2, rdzv conf {RDZV_CONF}; torchrun tuned: "
                      "--nnodes 2 --rdzv-backend c10d, --monitor-interval 0.001, "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. Node 0 hosts the rendezvous store in both.")
    return Result(NAME, [main], data)
