"""A PyTorch Lightning DDP job, written the way Lightning's users write them: it knows nothing of supervisord-ft.

Started by a torchrun-style launcher (one process per rank, with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT and TORCHELASTIC_RUN_ID set), Lightning detects its
TorchElasticEnvironment and trains in the processes it was given instead of spawning its own;
``--devices`` must then equal WORLD_SIZE (one node), or Lightning refuses to start. Everything it
prints is Lightning's own; this script prints nothing.

    torchrun --nproc-per-node 2 tests/jobs/lightning_ddp.py --steps 200
"""

from __future__ import annotations

import argparse
import sys
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES = 512
BATCH = 16


class LinearRegression(L.LightningModule):
    def __init__(self, step_time: float) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)
        self.step_time = step_time

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-time", type=float, default=0.0, help="seconds slept in each training_step")
    p.add_argument("--devices", type=int, default=2, help="processes per node; WORLD_SIZE under a launcher")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=args.devices,
        max_steps=args.steps,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LinearRegression(args.step_time), train_dataloaders=synthetic_data())
    return 0


if __name__ == "__main__":
    sys.exit(main())
