"""A plain torchrun-style DDP job, written the way users write them: it knows nothing of supervisord-ft.

No imports from ``worker`` or ``supervisord_ft``, no JSON step lines, no signal handlers, no
checkpoint to resume from: a relaunch simply trains again from step 0. The flags give it the
shapes a watchdog has to judge from the outside:

* ``--print rank0``: rank 0 prints a plain text line about once a second; ``--print none``: no
  rank ever prints anything (stdout or stderr), unless a real exception escapes.
* ``--hang-rank R --hang-step K --hang-mode spin|sleep``: on the first attempt only
  (``TORCHELASTIC_RESTART_COUNT`` unset or 0), rank R stops at step K before that step's
  collective, in ``spin_forever`` (a pure-Python busy loop) or ``sleep_forever``; its peers block
  in the all-reduce.
* ``--slow-every M --slow-factor F``: every M-th step sleeps F times ``--step-time`` (an eval phase).
* ``--save-every M --save-seconds T``: every M-th step rank 0 writes random bytes steadily for T
  seconds into ``$SUPERVISORD_FT_CHECKPOINT_DIR`` (a temporary directory when unset) while the other
  ranks wait in ``dist.barrier()``: T seconds with no collective completed and no output.
* ``--load-seconds T``: before the loop every rank reads a 64 MiB file for T seconds (a checkpoint load).

    torchrun --nproc-per-node 2 tests/jobs/ddp_plain.py --steps 100 --print none
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

MIB = 1 << 20
SAMPLES = 512
BATCH = 16
LOAD_FILE_MIB = 64
SAVE_CHUNK_PAUSE = 0.1  # seconds between 1 MiB writes of a save: about 10 MiB per second


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--step-time", type=float, default=0.05, help="seconds slept per step")
    p.add_argument("--print", dest="print_mode", choices=("rank0", "none"), default="rank0")
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--hang-step", type=int, default=None)
    p.add_argument("--hang-mode", choices=("spin", "sleep"), default="spin")
    p.add_argument("--slow-every", type=int, default=0)
    p.add_argument("--slow-factor", type=float, default=10.0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--save-seconds", type=float, default=5.0)
    p.add_argument("--load-seconds", type=float, default=0.0)
    args = p.parse_args(argv)
    if (args.hang_rank is None) != (args.hang_step is None):
        p.error("--hang-rank and --hang-step go together")
    return args


def spin_forever() -> None:
    """Burn a core in pure Python and never return: a rank stuck in its own code, not in torch."""
    x = 0
    while True:
        x += 1


def sleep_forever() -> None:
    """Never return, using no CPU: a rank blocked on something that never comes."""
    while True:
        time.sleep(3600)


def first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0") == 0


def synthetic_shard(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dataset on every rank and every attempt (seeded), split by rank."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return x[rank::world_size], y[rank::world_size]


def simulate_load(seconds: float) -> None:
    """Read a 64 MiB file in 1 MiB chunks, over and over, until ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    chunk = os.urandom(MIB)
    with tempfile.TemporaryDirectory(prefix="ddp_plain_load_") as d:
        path = Path(d) / "model.bin"
        with open(path, "wb") as f:
            for _ in range(LOAD_FILE_MIB):
                f.write(chunk)
        while time.monotonic() < deadline:
            with open(path, "rb") as f:
                while time.monotonic() < deadline and f.read(MIB):
                    pass


def simulate_save(directory: Path, step: int, seconds: float) -> None:
    """Write random bytes steadily for ``seconds``, fsync, rename into place, drop the previous save."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ddp_plain_step_{step}.bin"
    partial = directory / f".ddp_plain_step_{step}.bin.partial"
    deadline = time.monotonic() + seconds
    with open(partial, "wb") as f:
        while time.monotonic() < deadline:
            f.write(os.urandom(MIB))
            time.sleep(min(SAVE_CHUNK_PAUSE, max(0.0, deadline - time.monotonic())))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, final)
    for old in directory.glob("ddp_plain_step_*.bin"):
        if old != final:
            old.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = synthetic_shard(rank, world_size)
    per_epoch = len(x) // BATCH
    talk = args.print_mode == "rank0" and rank == 0
    hang_here = args.hang_rank == rank and first_attempt()
    save_dir = None
    if args.save_every > 0 and rank == 0:
        save_dir = Path(os.environ.get("SUPERVISORD_FT_CHECKPOINT_DIR") or tempfile.mkdtemp(prefix="ddp_plain_ckpt_"))

    if args.load_seconds > 0:
        simulate_load(args.load_seconds)

    started = last_print = time.monotonic()
    for step in range(args.steps):
        if hang_here and step == args.hang_step:
            if args.hang_mode == "spin":
                spin_forever()
            sleep_forever()
        epoch, i = divmod(step, per_epoch)
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()  # DDP's gradient all-reduce: every rank must reach this step
        opt.step()
        slow = args.slow_every > 0 and (step + 1) % args.slow_every == 0
        time.sleep(args.step_time * (args.slow_factor if slow else 1.0))
        if args.save_every > 0 and (step + 1) % args.save_every == 0:
            if save_dir is not None:
                simulate_save(save_dir, step + 1, args.save_seconds)
            dist.barrier()
        now = time.monotonic()
        if talk and (step == 0 or now - last_print >= 1.0):
            print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            last_print = now
    if talk:
        print(f"finished {args.steps} steps in {time.monotonic() - started:.1f}s", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
