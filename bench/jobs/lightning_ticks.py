"""A Lightning DDP job as its users write it, plus what the bench reads: rank 0 prints
``{"event": "tick", "time": T, "restart": R}`` after every training step (``tick``: no convention
of the daemon's), and rank 1 prints ``{"event": "crash", "time": T}`` and raises at step
``--crash-at`` of the first attempt. It resumes from Lightning's own checkpoints.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RESTART = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def say(**fields: object) -> None:
    """One line in one write: under torchrun (``python -u``) ranks share one stdout, and print()
    writes the text and its newline apart, so another rank's line can land between them."""
    os.write(1, (json.dumps(fields) + "\n").encode())


class Model(L.LightningModule):
    def __init__(self, crash_at: int, step_time: float) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)
        self.crash_at, self.step_time = crash_at, step_time

    def training_step(self, batch, batch_idx):
        if RESTART == 0 and self.global_rank == 1 and self.global_step == self.crash_at:
            say(event="crash", time=time.time())
            raise RuntimeError("injected crash")
        time.sleep(self.step_time)
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_rank == 0:
            say(event="tick", time=time.time(), restart=RESTART)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint-dir", type=Path, required=True)
    p.add_argument("--crash-at", type=int, default=300)
    p.add_argument("--step-time", type=float, default=0.03)
    p.add_argument("--steps", type=int, default=100_000)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    saved = sorted(args.checkpoint_dir.glob("*.ckpt"), key=lambda q: q.stat().st_mtime)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
                        max_steps=args.steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[L.pytorch.callbacks.ModelCheckpoint(
                            dirpath=args.checkpoint_dir, every_n_train_steps=50, save_top_k=1)])
    trainer.fit(Model(args.crash_at, args.step_time), data, ckpt_path=saved[-1] if saved else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
