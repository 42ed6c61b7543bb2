"""What the daemon knows of the built-in job (``python -m supervisord_ft_worker``): its defaults and its argv.

Torch-free, so the daemon can build the command line without importing the job; the job's own
argument parser takes its defaults from here, so each is written once.
"""

from __future__ import annotations

import sys
from pathlib import Path

EPOCHS = 20
STEPS_PER_EPOCH = 30
CHECKPOINT_INTERVAL = 10
SEED = 0
KEEP_CHECKPOINTS = 3  # also the daemon's default retention for any job


def argv(*, epochs: int, steps: int, checkpoint_interval: int, seed: int, checkpoint_dir: Path,
         keep_checkpoints: int, resume_from: Path | None,
         crash: tuple[int, int] | None, jit_checkpoint: bool = True) -> tuple[str, ...]:
    """The command every rank runs; ``crash`` is (step, rank) of an injected crash, or None;
    without ``jit_checkpoint`` survivors of a dead peer exit without saving."""
    args = [sys.executable, "-m", "supervisord_ft_worker", "--epochs", str(epochs), "--steps", str(steps),
            "--checkpoint_interval", str(checkpoint_interval), "--seed", str(seed),
            "--checkpoint_dir", str(checkpoint_dir.resolve()),
            "--keep_checkpoints", str(keep_checkpoints)]
    if crash is not None:
        args += ["--crash_at_step", str(crash[0]), "--crash_rank", str(crash[1])]
    if not jit_checkpoint:
        args.append("--no-jit_checkpoint")
    if resume_from is not None:
        args += ["--resume_from_checkpoint", str(resume_from.resolve())]
    return tuple(args)
