"""A plain DDP job that checkpoints and resumes as users write them, with the failures users meet.

It knows nothing of supervisord-ft: it reads torchrun's variables, saves ``ckpt_<step>.pt`` (its
own naming, written to a temporary and renamed) into ``$SUPERVISORD_FT_CHECKPOINT_DIR`` every
``--save-every`` steps and resumes from the newest one. Only rank 0 prints, a plain line every 10
steps. Faults, on every attempt unless ``--fault-attempts`` says how many (from the first):

* ``--raise-rank R --raise-step K``: rank R (-1: every rank) raises ``ValueError`` in ``load_batch`` at step K;
  with ``--knock-on``, it first tears its process group down and waits ``--knock-on-delay``
  seconds, so its peers die of the lost connection before it raises.
* ``--record``: ``main`` is wrapped in torch's ``@record`` (it writes ``TORCHELASTIC_ERROR_FILE``);
  ``--quiet-stderr``: the raising rank's stderr goes to /dev/null first (the file is all there is).
* ``--oom-rank R --oom-step K``: rank R allocates memory until the kernel kills it.
* ``--crash-after N``: rank 1 raises ``RuntimeError`` N steps after the step it resumed from.

``--pg-timeout S``: the process group's collective timeout (gloo's default is 30 minutes). A
process group torn down by one rank does not close its connections while the process lives (an
optimizer holds on to it), so its peers learn of it by this timeout ("Timed out waiting").

    torchrun --nproc-per-node 2 tests/jobs/ddp_faults.py --steps 300 --save-every 50 \\
        --raise-rank 1 --raise-step 150
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from ddp_plain import BATCH, synthetic_shard

OOM_CHUNK = 25_000_000  # float32s: 100 MB a tensor, every page written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--step-time", type=float, default=0.005)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--fault-attempts", type=int, default=1 << 30)
    p.add_argument("--raise-rank", type=int, default=None)
    p.add_argument("--raise-step", type=int, default=None)
    p.add_argument("--knock-on", action="store_true")
    p.add_argument("--knock-on-delay", type=float, default=2.0)
    p.add_argument("--record", action="store_true")
    p.add_argument("--quiet-stderr", action="store_true")
    p.add_argument("--oom-rank", type=int, default=None)
    p.add_argument("--oom-step", type=int, default=None)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--pg-timeout", type=float, default=None)
    return p.parse_args(argv)


def checkpoint_dir() -> Path:
    d = Path(os.environ.get("SUPERVISORD_FT_CHECKPOINT_DIR") or tempfile.mkdtemp(prefix="ddp_faults_"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def newest(directory: Path) -> Path | None:
    found = [(int(p.stem.split("_")[1]), p) for p in directory.glob("ckpt_*.pt") if p.stem.split("_")[1].isdigit()]
    return max(found)[1] if found else None


def save(directory: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    partial = directory / f".ckpt_{step}.pt.partial"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()}, partial)
    os.replace(partial, directory / f"ckpt_{step}.pt")


def load_batch(step: int, x: torch.Tensor, y: torch.Tensor, fail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if fail:
        raise ValueError(f"no batch {step}: the shard's index is corrupt")
    i = step % (len(x) // BATCH)
    return x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]


def exhaust_memory() -> None:
    hoard = []
    while True:
        hoard.append(torch.ones(OOM_CHUNK))


def train(args: argparse.Namespace) -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout) if args.pg_timeout else None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    faulty = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0") < args.fault_attempts
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    directory = checkpoint_dir()
    start = 0
    if (path := newest(directory)) is not None:
        state = torch.load(path, weights_only=True)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    x, y = synthetic_shard(rank, world_size)
    for step in range(start, args.steps):
        raising = faulty and args.raise_rank in (rank, -1) and step == args.raise_step
        if raising and args.knock_on:
            dist.destroy_process_group()
            time.sleep(args.knock_on_delay)
        if raising and args.quiet_stderr:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        if faulty and rank == args.oom_rank and step == args.oom_step:
            exhaust_memory()
        if faulty and rank == 1 and args.crash_after is not None and step == start + args.crash_after:
            raise RuntimeError(f"crashed {args.crash_after} steps after resuming from step {start}")
        xb, yb = load_batch(step, x, y, raising)
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(args.step_time)
        if (step + 1) % args.save_every == 0:
            if rank == 0:
                save(directory, step + 1, model.module, opt)
            dist.barrier()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return (record(train) if args.record else train)(args)


if __name__ == "__main__":
    sys.exit(main())
