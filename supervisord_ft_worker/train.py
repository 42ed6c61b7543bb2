"""The built-in job (``python -m supervisord_ft_worker``): a data-parallel MLP that checkpoints, resumes and stops on request.

Determinism is the point. With the same seed and world size, a run that crashes or is stopped and
then resumes from its newest checkpoint ends with weights bit-identical to a run that never
stopped, because every input to a step is either a pure function of (seed, step, rank) (the
data, and the seed dropout draws from) or saved in the checkpoint (weights, momentum), and CPU
kernels run on one thread. No RNG stream is saved, so any one rank's state is the whole
checkpoint: when a peer dies, each survivor saves its last completed step at once
(:class:`~supervisord_ft_worker.contract.SaveOnFailure`), and periodic saves are written in the background
(:class:`~supervisord_ft_worker.async_checkpoint.AsyncCheckpointer`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from supervisord_ft import builtin_job
from supervisord_ft.errors import CheckpointError, ConfigError

from .async_checkpoint import AsyncCheckpointer, WriteFailed
from .checkpoint import load_checkpoint, newest_checkpoint
from .contract import CheckpointRequest, SaveOnFailure, StopFlag, SupervisorEnv, emit, exit_now, report_progress
from .startup import CLOCK

IN_FEATURES = 16
DROPOUT = 0.1
LEARNING_RATE = 0.05
MOMENTUM = 0.9
EXIT_REFUSED = 2  # bad arguments or a checkpoint this run must not resume from: retrying cannot help
EXIT_CRASHED = 1  # a runtime error, such as a collective that failed because a peer died
EXIT_CHECKPOINT_FAILED = 3  # a save failed (disk full, I/O error); the previous checkpoint stands
DISK_FULL_LIMIT = 4096  # bytes a file may grow to once --disk_full_at_step has struck
AUTO = Path("auto")  # --resume_from_checkpoint auto
STATE_KEYS = frozenset(
    {"model", "optimizer", "epoch", "global_step", "steps_per_epoch", "world_size", "seed"}
)


class CheckpointWriteError(Exception):
    """Saving failed; unlike :class:`CheckpointError` this is the disk, not the file's content."""


@dataclass(frozen=True)
class Options:
    epochs: int
    steps: int  # per epoch
    checkpoint_interval: int  # in global steps
    checkpoint_dir: Path
    resume_from_checkpoint: Path | None
    crash_at_step: int | None
    crash_rank: int
    crash_exit_code: int
    disk_full_at_step: int | None
    seed: int
    keep_checkpoints: int
    batch_size: int
    hidden: int
    step_time: float  # seconds of simulated compute per step
    jit_checkpoint: bool  # survivors of a failed collective save their last completed step
    async_checkpoint: bool  # periodic saves are written in the background

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None, env: SupervisorEnv) -> Options:
    """Flags accept both ``--snake_case`` and ``--kebab-case``; path defaults come from the supervisor."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisord_ft_worker", description=__doc__.splitlines()[0], allow_abbrev=False
    )

    def option(name: str, **kwargs: Any) -> None:
        spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
        parser.add_argument(*spellings, dest=name, **kwargs)

    option("epochs", type=_positive, default=builtin_job.EPOCHS)
    option("steps", type=_positive, default=builtin_job.STEPS_PER_EPOCH, help="steps per epoch")
    option("checkpoint_interval", type=_positive, default=builtin_job.CHECKPOINT_INTERVAL,
           help="save every N global steps")
    option("checkpoint_dir", type=Path, default=env.checkpoint_dir or Path("checkpoints"))
    option("resume_from_checkpoint", type=Path, default=env.resume_from, metavar="PATH|auto",
           help="auto: the supervisor's choice, else the newest intact checkpoint in --checkpoint_dir "
           "(so the same command resumes under torchrun, which names no file)")
    option("crash_at_step", type=_positive, default=None, metavar="K", help="fault injection: die after step K")
    option("crash_rank", type=int, default=0, metavar="R", help="the rank that dies")
    option("crash_exit_code", type=int, default=1, metavar="C",
           help="its exit status; 0 makes it a rank that quits early without an error")
    option("disk_full_at_step", type=_positive, default=None, metavar="K",
           help="fault injection: from step K on, rank 0's writes fail as on a full disk (a save "
                "in flight at K completes first)")
    option("seed", type=int, default=builtin_job.SEED)
    option("keep_checkpoints", type=_positive, default=env.keep_checkpoints)
    option("batch_size", type=_positive, default=32)
    option("hidden", type=_positive, default=64)
    option("step_time", type=_non_negative, default=0.0, help="seconds of sleep per step, to simulate compute")
    option("jit_checkpoint", action=argparse.BooleanOptionalAction, default=True,
           help="when a collective fails (a peer died), save the last completed step before exiting")
    option("async_checkpoint", action=argparse.BooleanOptionalAction, default=True,
           help="write periodic checkpoints in a background thread from a snapshot")
    args = parser.parse_args(argv)
    if not 0 <= args.crash_rank < env.world_size:
        parser.error(f"--crash_rank {args.crash_rank} is not a rank of WORLD_SIZE={env.world_size}")
    if max(env.restart_count, env.torchelastic_restart_count) > 0:  # faults strike the first attempt only
        args.crash_at_step = args.disk_full_at_step = None
    if args.resume_from_checkpoint == AUTO:
        args.resume_from_checkpoint = env.resume_from or newest_checkpoint(args.checkpoint_dir)
    return Options(**vars(args))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed for the stream named by ``parts``; different parts give unrelated streams."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()) >> 1


@dataclass(frozen=True)
class SyntheticRegression:
    """Targets ``sin(x @ teacher)``. A batch depends only on (seed, step, rank), never on history."""

    seed: int
    batch_size: int
    teacher: torch.Tensor

    @classmethod
    def create(cls, seed: int, batch_size: int) -> SyntheticRegression:
        teacher = torch.randn(IN_FEATURES, generator=torch.Generator().manual_seed(derive_seed(seed, "teacher")))
        return cls(seed, batch_size, teacher)

    def batch(self, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batch", step, rank))
        x = torch.randn(self.batch_size, IN_FEATURES, generator=generator)
        return x, torch.sin(x @ self.teacher).unsqueeze(1)


def build_model(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return nn.Sequential(
        nn.Linear(IN_FEATURES, hidden),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


def weights_sha256(model: nn.Module) -> str:
    """A digest of the exact weight bytes: equal only for bit-identical models."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def all_reduce_step(
    params: list[nn.Parameter], loss: torch.Tensor, stop: bool, save: bool, world_size: int
) -> tuple[float, bool, bool]:
    """Average gradients and loss over ranks and agree whether to stop and whether to save, all
    in one collective.

    The votes travel with the gradients, so ranks that got SIGTERM (or SIGUSR1) at slightly
    different moments still act after the same step; a rank stopping or saving alone would block
    its peers in the next collective. Returns (mean loss, any rank asked to stop, any rank asked
    for a checkpoint).
    """
    extras = torch.tensor([loss.item(), float(stop), float(save)])
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [extras])
    dist.all_reduce(flat)
    flat[:-2].div_(world_size)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[-3].item(), flat[-2].item() > 0, flat[-1].item() > 0


class Trainer:
    """One rank's model, optimizer and position; all checkpoint I/O of the job goes through it."""

    def __init__(self, opts: Options, env: SupervisorEnv) -> None:
        self.opts = opts
        self.env = env
        self.model = build_model(opts.seed, opts.hidden)
        self.params = list(self.model.parameters())
        # Building it imports torch._dynamo (as long again as torch; in the `load` start-up phase).
        self.optimizer = torch.optim.SGD(self.params, lr=LEARNING_RATE, momentum=MOMENTUM)
        self.task = SyntheticRegression.create(opts.seed, opts.batch_size)
        self.step = 0  # completed global steps: the weights and momentum are those after this step
        resumed = opts.resume_from_checkpoint
        self.checkpointer = AsyncCheckpointer(opts.checkpoint_dir, keep=opts.keep_checkpoints,
                                              protect=[resumed] if resumed else [])
        self.on_failure = (SaveOnFailure(self.save_now, EXIT_CRASHED) if opts.jit_checkpoint
                           else contextlib.nullcontext())

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.opts.steps

    def restore(self, path: Path) -> None:
        """Continue from ``path``; :class:`CheckpointError` if this run must not resume from it."""
        state = load_checkpoint(path)
        missing = STATE_KEYS - state.keys()
        if missing:
            raise CheckpointError(f"checkpoint {path} is not a state of this job (missing {sorted(missing)})")
        if state["world_size"] != self.env.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {state['world_size']} ranks, this run has {self.env.world_size}"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not fit this model: {reason}") from None
        self.step = state["global_step"]

    def state(self) -> dict[str, Any]:
        """The checkpoint of completed step ``self.step``: equal on every rank, so any rank may write it."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch_of(self.step),
            "global_step": self.step,
            "steps_per_epoch": self.opts.steps,
            "world_size": self.env.world_size,
            "seed": self.opts.seed,
        }

    def train_step(self, stop_flag: StopFlag, save_request: CheckpointRequest) -> tuple[float, bool, bool]:
        """One global step on every rank. Returns (mean loss, whether the ranks agreed to stop after
        it, whether some rank asked for a checkpoint after it)."""
        step = self.step + 1
        x, y = self.task.batch(step, self.env.rank)
        torch.manual_seed(derive_seed(self.opts.seed, "dropout", step, self.env.rank))
        self.model.zero_grad()
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        if self.opts.step_time:
            time.sleep(self.opts.step_time)
        # The flags are read as late as possible, so a signal during the compute counts for this step.
        with self.on_failure:  # a peer died: save step - 1, whose update is the last one applied
            mean_loss, stop, save = all_reduce_step(
                self.params, loss, stop_flag.requested, save_request.take(), self.env.world_size
            )
        self.optimizer.step()
        self.step = step
        return mean_loss, stop, save

    def save(self) -> None:
        """Rank 0 saves the state in the background; the next save waits for this one."""
        if self.env.rank == 0:
            with self._failures_reported():
                copied = self.checkpointer.save(self.state(), self.step)
                emit("checkpoint_started", step=self.step, snapshot_seconds=round(copied, 4))
                if not self.opts.async_checkpoint:
                    self.checkpointer.wait()

    def check_saves(self, wait: bool = False) -> None:
        """Raise :class:`CheckpointWriteError` if a background save failed; with ``wait``, first
        wait until the save in flight is durable (before exiting)."""
        with self._failures_reported():
            self.checkpointer.wait() if wait else self.checkpointer.check()

    def save_now(self) -> Path:
        """The just-in-time save of the last completed step, on a failed collective."""
        return self.checkpointer.save_now(self.state(), self.step)

    @contextlib.contextmanager
    def _failures_reported(self) -> Iterator[None]:
        try:
            yield
        except WriteFailed as exc:
            # atomic_write removed its temporary: the newest complete checkpoint is still the last one.
            error = exc.error
            emit("checkpoint_failed", step=exc.step, error=getattr(error, "strerror", None) or str(error))
            raise CheckpointWriteError(str(exc)) from None


def fill_disk() -> None:
    """Fault injection: from now on this process's writes fail as on a full disk (EFBIG)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_LIMIT, resource.RLIM_INFINITY))


def train(opts: Options, env: SupervisorEnv) -> None:
    stop_flag = StopFlag().install()
    save_request = CheckpointRequest().install()
    torch.set_num_threads(1)
    trainer = Trainer(opts, env)
    if opts.resume_from_checkpoint is not None:
        # Before the rendezvous: every rank refuses a bad file alike, and none is left waiting for a peer.
        trainer.restore(opts.resume_from_checkpoint)
    resumed_at = trainer.step
    CLOCK.mark("load")
    dist.init_process_group("gloo", init_method="env://", rank=env.rank, world_size=env.world_size)
    CLOCK.mark("rendezvous")
    finished = False
    try:
        while trainer.step < opts.total_steps:
            loss, stop, requested = trainer.train_step(stop_flag, save_request)
            report_progress(trainer.step, epoch=trainer.epoch_of(trainer.step), loss=loss, time=time.time())
            if trainer.step == resumed_at + 1:
                CLOCK.mark("first_step")
                emit("startup_timings", rank=env.rank, pid=os.getpid(), resumed_at=resumed_at,
                     attempt=max(env.restart_count, env.torchelastic_restart_count), **CLOCK.report())
            if trainer.step == opts.disk_full_at_step and env.rank == 0:
                trainer.checkpointer.wait()  # a save already in flight lands first: the fault is in later ones
                fill_disk()
            trainer.check_saves()
            periodic = trainer.step % opts.checkpoint_interval == 0 or trainer.step == opts.total_steps
            if stop or requested or periodic:
                trainer.save()
            if trainer.step == opts.crash_at_step and env.rank == opts.crash_rank:
                emit("injected_crash", step=trainer.step, exit_code=opts.crash_exit_code, time=time.time())
                os._exit(opts.crash_exit_code)  # abrupt on purpose: no cleanup, like a real fault
            if stop and trainer.step < opts.total_steps:
                trainer.check_saves(wait=True)
                emit("stopped", step=trainer.step)
                finished = True
                return
        trainer.check_saves(wait=True)
        emit("training_done", step=trainer.step, weights_sha256=weights_sha256(trainer.model))
        finished = True
    finally:
        if finished:  # after an error the group is broken: main exits without tearing it down
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; the one place that turns errors into exit codes."""
    CLOCK.mark("import")
    try:
        env = SupervisorEnv.from_env()
        train(parse_args(argv, env), env)
    except (ConfigError, CheckpointError) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except CheckpointWriteError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        exit_now(EXIT_CHECKPOINT_FAILED)  # at once: its peers' failures come after its own
    except RuntimeError:
        # A collective that failed because a peer died, with --no-jit_checkpoint (else
        # SaveOnFailure handled it), or another runtime error: the group is broken.
        traceback.print_exc()
        exit_now(EXIT_CRASHED)
    return 0
