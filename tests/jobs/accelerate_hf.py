"""An HF accelerate job, written the way accelerate's users write them: it knows nothing of supervisord-ft.

A tiny GPT-2 built from a config in code (nothing downloaded), trained on random token ids with
``Accelerator`` (which reads torchrun's variables and joins a gloo group on CPU). Every
``--save-every`` steps ``accelerator.save_state`` writes ``step_<N>/`` into
``$SUPERVISORD_FT_CHECKPOINT_DIR``, and the job resumes from the newest with ``load_state``.
``--crash-when PATH``: on the first attempt, rank 1 raises at the first step once PATH exists.
Only the main process prints, through ``accelerator.print``: where it resumed, then every 10 steps.

    torchrun --nproc-per-node 2 tests/jobs/accelerate_hf.py --steps 60
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--crash-when", type=Path, default=None)
    args = p.parse_args()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    directory = Path(os.environ.get("SUPERVISORD_FT_CHECKPOINT_DIR", "checkpoints"))
    saved = sorted((int(d.name.split("_")[1]), d) for d in directory.glob("step_*") if d.name.split("_")[1].isdigit())
    start = 0
    if saved:
        start, newest = saved[-1]
        accelerator.load_state(str(newest))
    accelerator.print(f"resuming at step {start}")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    g = torch.Generator().manual_seed(accelerator.process_index)
    for step in range(start, args.steps):
        if (first_attempt and accelerator.process_index == 1 and args.crash_when is not None
                and args.crash_when.exists()):
            raise RuntimeError(f"crashed at step {step}")
        ids = torch.randint(0, 64, (4, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % args.save_every == 0:
            accelerator.save_state(str(directory / f"step_{step + 1}"))
        if step % 10 == 0:
            accelerator.print(f"step {step} loss {loss.item():.4f}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
