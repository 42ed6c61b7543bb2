"""The two programs the benchmarks launch: the real training worker and the torch-free light worker.

A job turns into one command line that both launchers run unmodified: our daemon as
``-- python <target> <args>``, torchrun as ``<target> <args>``. The training job resumes with
``--resume_from_checkpoint auto``: under our daemon that is the supervisor's choice, under
torchrun (which names no file) the newest intact checkpoint in the directory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

LIGHT_WORKER = Path(__file__).resolve().with_name("light_worker.py")
JOBS = Path(__file__).resolve().with_name("jobs")


@dataclass(frozen=True)
class Program:
    target: tuple[str, ...]  # ("-m", "supervisord_ft_worker") or (script,)
    args: tuple[str, ...]


@dataclass(frozen=True)
class TrainJob:
    """``python -m supervisord_ft_worker``: a gloo data-parallel MLP. The defaults never finish on their own."""

    steps: int = 10_000_000
    checkpoint_interval: int = 50
    step_time: float = 0.01  # simulated compute per step, so a step costs what a small real one does
    hidden: int = 64
    batch_size: int = 32
    crash_at_step: int | None = None  # first attempt only
    crash_rank: int = 1
    jit_checkpoint: bool = True  # survivors of a dead peer save their last completed step
    async_checkpoint: bool = True  # periodic saves written in the background

    def program(self, checkpoint_dir: Path) -> Program:
        args = ["--epochs", "1", "--steps", str(self.steps), "--checkpoint_interval", str(self.checkpoint_interval),
                "--step_time", str(self.step_time), "--hidden", str(self.hidden), "--batch_size", str(self.batch_size),
                "--checkpoint_dir", str(checkpoint_dir), "--resume_from_checkpoint", "auto"]
        args += [] if self.jit_checkpoint else ["--no-jit_checkpoint"]
        args += [] if self.async_checkpoint else ["--no-async_checkpoint"]
        if self.crash_at_step is not None:
            args += ["--crash_at_step", str(self.crash_at_step), "--crash_rank", str(self.crash_rank)]
        return Program(("-m", "supervisord_ft_worker"), tuple(args))

    @property
    def parameters(self) -> int:
        """The model's size: Linear(16, h), Linear(h, h), Linear(h, 1) (see ``supervisord_ft_worker.train.build_model``)."""
        h = self.hidden
        return 16 * h + h + h * h + h + h + 1


@dataclass(frozen=True)
class LightJob:
    """``bench/light_worker.py`` with its flags (see there)."""

    args: tuple[str, ...] = ()

    def program(self, checkpoint_dir: Path) -> Program:
        return Program((str(LIGHT_WORKER),), self.args)


@dataclass(frozen=True)
class ForeignJob:
    """A script of ``bench/jobs/`` written as users write theirs, taking ``--checkpoint-dir``."""

    script: str
    args: tuple[str, ...] = ()

    def program(self, checkpoint_dir: Path) -> Program:
        return Program((str(JOBS / self.script),), (*self.args, "--checkpoint-dir", str(checkpoint_dir)))


Job = TrainJob | LightJob | ForeignJob
PYTHON = sys.executable
