"""A plain DDP script as its users write it (gloo, no checkpoint), plus what the bench reads:
rank 0 prints ``{"event": "tick", "time": T, "restart": R}`` after every step, and rank 1 prints
``{"event": "crash", "time": T}`` and raises at step ``--crash-at`` of the first attempt
(``--crash-at 50`` at 20 ms a step: about 1 s into training, where failures cluster).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

RESTART = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def say(**fields: object) -> None:
    """One line in one write: under torchrun (``python -u``) ranks share one stdout, and print()
    writes the text and its newline apart, so another rank's line can land between them."""
    os.write(1, (json.dumps(fields) + "\n").encode())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint-dir")  # the bench's, unused: a relaunch starts over
    p.add_argument("--crash-at", type=int, default=50)
    p.add_argument("--step-time", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=100_000)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = DistributedDataParallel(nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(16, 8)
    for step in range(args.steps):
        if RESTART == 0 and rank == 1 and step == args.crash_at:
            say(event="crash", time=time.time())
            raise RuntimeError("injected crash")
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(args.step_time)
        if rank == 0:
            say(event="tick", time=time.time(), restart=RESTART)
    return 0


if __name__ == "__main__":
    sys.exit(main())
