"""A PyTorch Lightning DDP job, written the way Lightning's users write them: it knows nothing of supervisord-ft.

Started by a torchrun-style launcher (one process per rank, with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and TORCHELASTIC_RUN_ID set), Lightning detects its
TorchElasticEnvironment and trains in the processes it was given instead of spawning its own;
``--devices`` must then equal WORLD_SIZE (one node), or Lightning refuses to start. Everything it
prints is Lightning's own; this script prints nothing.

With ``--save-every M`` Lightning's ``ModelCheckpoint`` saves ``step=<N>.ckpt`` into
``$SUPERVISORD_FT_CHECKPOINT_DIR`` every M steps and the job resumes from the newest;
``--crash-after N``: rank 1 raises N steps after the step it resumed from, and a warning is the
last line its stderr gets (printed at exit, after the traceback); ``--crash-when PATH``: on the
first attempt, rank 1 raises at the first step once PATH exists.

    torchrun --nproc-per-node 2 tests/jobs/lightning_ddp.py --steps 200
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES = 512
BATCH = 16


class LinearRegression(L.LightningModule):
    def __init__(self, step_time: float, crash_after: int | None = None,
                 crash_when: Path | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)
        self.step_time = step_time
        self.crash_after = crash_after
        self.crash_when = crash_when
        self.resumed_at = 0

    def on_train_start(self) -> None:
        self.resumed_at = self.global_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if (self.crash_after is not None and self.global_rank == 1
                and self.global_step == self.resumed_at + self.crash_after):
            atexit.register(print, "UserWarning: `Trainer.some_flag` is deprecated", file=sys.stderr)
            raise RuntimeError(f"crashed {self.crash_after} steps after resuming from step {self.resumed_at}")
        if (self.crash_when is not None and self.global_rank == 1 and self.crash_when.exists()
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            raise RuntimeError(f"crashed at step {self.global_step}")
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        if self.step_time > 0:
            time.sleep(self.step_time)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def synthetic_data() -> DataLoader:
    """The same dataset on every rank; Lightning's DistributedSampler splits it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, num_workers=0)


def newest_checkpoint(directory: Path) -> Path | None:
    steps = [(int(p.stem.split("=")[1]), p) for p in directory.glob("step=*.ckpt")
             if p.stem.split("=")[1].isdigit()]
    return max(steps)[1] if steps else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-time", type=float, default=0.0, help="seconds slept in each training_step")
    p.add_argument("--devices", type=int, default=2, help="processes per node; WORLD_SIZE under a launcher")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--crash-when", type=Path, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    callbacks, resume = [], None
    if args.save_every > 0:
        directory = Path(os.environ.get("SUPERVISORD_FT_CHECKPOINT_DIR", "checkpoints"))
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=directory, filename="{step}", every_n_train_steps=args.save_every, save_top_k=-1))
        resume = newest_checkpoint(directory)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=args.devices,
        max_steps=args.steps,
        enable_checkpointing=args.save_every > 0,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LinearRegression(args.step_time, args.crash_after, args.crash_when), train_dataloaders=synthetic_data(),
                ckpt_path=resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
