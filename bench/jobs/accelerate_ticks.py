"""An HF accelerate job as its users write it (a tiny GPT-2 built from a config in code, nothing
downloaded), plus what the bench reads: rank 0 prints ``{"event": "tick", "time": T, "restart":
R}`` after every step, and rank 1 prints ``{"event": "crash", "time": T}`` and raises at step
``--crash-at`` of the first attempt. Every 50 steps ``accelerator.save_state`` writes
``step_<N>/`` into ``--checkpoint-dir``; the job resumes from the newest with ``load_state``.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

RESTART = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def say(**fields: object) -> None:
    """One line in one write (see ddp_ticks.py)."""
    os.write(1, (json.dumps(fields) + "\n").encode())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint-dir", type=Path, required=True)
    p.add_argument("--crash-at", type=int, default=300)
    p.add_argument("--step-time", type=float, default=0.03)
    p.add_argument("--steps", type=int, default=100_000)
    args = p.parse_args()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    saved = sorted((int(d.name.split("_")[1]), d) for d in args.checkpoint_dir.glob("step_*")
                   if d.name.split("_")[1].isdigit())
    start = 0
    if saved:
        start, newest = saved[-1]
        accelerator.load_state(str(newest))
    g = torch.Generator().manual_seed(accelerator.process_index)
    for step in range(start, args.steps):
        if RESTART == 0 and accelerator.process_index == 1 and step == args.crash_at:
            say(event="crash", time=time.time())
            raise RuntimeError("injected crash")
        ids = torch.randint(0, 64, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        time.sleep(args.step_time)
        if (step + 1) % 50 == 0:
            accelerator.save_state(str(args.checkpoint_dir / f"step_{step + 1}"))
        if accelerator.is_main_process:
            say(event="tick", time=time.time(), restart=RESTART)
    return 0


if __name__ == "__main__":
    sys.exit(main())
