"""The built-in job (``python -m worker``): a data-parallel MLP that checkpoints, resumes and stops on request.

Determinism is the point. With the same seed and world size, a run that crashes or is stopped and
then resumes from its newest checkpoint ends with weights bit-identical to a run that never
stopped, because every input to a step is either a pure function of (seed, step, rank) (the
data) or saved in the checkpoint (weights, momentum, each rank's RNG streams that dropout draws
from), and CPU kernels run on one thread.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from supervisord_ft import builtin_job
from supervisord_ft.errors import CheckpointError, ConfigError

from . import rng
from .checkpoint import load_checkpoint, newest_checkpoint, save_checkpoint
from .contract import CheckpointRequest, StopFlag, SupervisorEnv, emit, report_progress
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
    {"model", "optimizer", "epoch", "global_step", "steps_per_epoch", "world_size", "seed", "rng_states"}
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
        prog="python -m worker", description=__doc__.splitlines()[0], allow_abbrev=False
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
           help="fault injection: from step K on, rank 0's writes fail as on a full disk")
    option("seed", type=int, default=builtin_job.SEED)
    option("keep_checkpoints", type=_positive, default=env.keep_checkpoints)
    option("batch_size", type=_positive, default=32)
    option("hidden", type=_positive, default=64)
    option("step_time", type=_non_negative, default=0.0, help="seconds of sleep per step, to simulate compute")
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


class MomentumSGD:
    """SGD with heavy-ball momentum: the update of ``torch.optim.SGD(lr, momentum)``, hand-written.

    Any ``torch.optim`` optimizer imports ``torch._dynamo`` on first use, about as long again as
    importing torch, paid on every (re)start. The whole state is one momentum buffer per parameter.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float) -> None:
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.buffers: list[torch.Tensor] | None = None  # created by the first step, as torch does

    @torch.no_grad()
    def step(self) -> None:
        if self.buffers is None:
            self.buffers = [p.grad.clone() for p in self.params]
        else:
            for buf, p in zip(self.buffers, self.params):
                buf.mul_(self.momentum).add_(p.grad)
        for buf, p in zip(self.buffers, self.params):
            p.add_(buf, alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffers": self.buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffers = state["momentum_buffers"]
        if buffers is not None and [b.shape for b in buffers] != [p.shape for p in self.params]:
            raise ValueError("momentum buffers do not match the parameters' shapes")
        self.buffers = buffers


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
        self.optimizer = MomentumSGD(self.params, LEARNING_RATE, MOMENTUM)
        self.task = SyntheticRegression.create(opts.seed, opts.batch_size)
        self.step = 0  # completed global steps
        rng.seed_all(derive_seed(opts.seed, "rank", env.rank))

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
        rng.restore(state["rng_states"][self.env.rank])
        self.step = state["global_step"]

    def train_step(self, stop_flag: StopFlag, save_request: CheckpointRequest) -> tuple[float, bool, bool]:
        """One global step on every rank. Returns (mean loss, whether the ranks agreed to stop after
        it, whether some rank asked for a checkpoint after it)."""
        self.step += 1
        x, y = self.task.batch(self.step, self.env.rank)
        self.model.zero_grad()
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        if self.opts.step_time:
            time.sleep(self.opts.step_time)
        # The flags are read as late as possible, so a signal during the compute counts for this step.
        mean_loss, stop, save = all_reduce_step(
            self.params, loss, stop_flag.requested, save_request.take(), self.env.world_size
        )
        self.optimizer.step()
        return mean_loss, stop, save

    def save(self) -> None:
        """Rank 0 writes the state, with every rank's RNG streams; no rank returns before the file is durable."""
        gathered: list[Any] | None = [None] * self.env.world_size if self.env.rank == 0 else None
        dist.gather_object(rng.capture(), gathered, dst=0)
        if gathered is not None:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch_of(self.step),
                "global_step": self.step,
                "steps_per_epoch": self.opts.steps,
                "world_size": self.env.world_size,
                "seed": self.opts.seed,
                "rng_states": dict(enumerate(gathered)),
            }
            resumed = self.opts.resume_from_checkpoint
            protect = [resumed] if resumed else []
            try:
                save_checkpoint(
                    state, self.step, self.opts.checkpoint_dir, keep=self.opts.keep_checkpoints, protect=protect
                )
            except OSError as exc:
                # atomic_write removed its temporary: the newest complete checkpoint is still the last one.
                emit("checkpoint_failed", step=self.step, error=exc.strerror or str(exc))
                raise CheckpointWriteError(f"cannot save the checkpoint of step {self.step}: {exc}") from None
        # No rank runs ahead (to an injected crash, or to exit) while the file is still being written.
        dist.barrier()


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
                fill_disk()
            periodic = trainer.step % opts.checkpoint_interval == 0 or trainer.step == opts.total_steps
            if stop or requested or periodic:
                trainer.save()
            if trainer.step == opts.crash_at_step and env.rank == opts.crash_rank:
                emit("injected_crash", step=trainer.step, exit_code=opts.crash_exit_code, time=time.time())
                os._exit(opts.crash_exit_code)  # abrupt on purpose: no cleanup, like a real fault
            if stop and trainer.step < opts.total_steps:
                emit("stopped", step=trainer.step)
                finished = True
                return
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
        print(f"worker: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # At once: a slow exit lets the peers, failing at the barrier, be reported first.
        os._exit(EXIT_CHECKPOINT_FAILED)
    except RuntimeError:
        # Mostly a collective that failed because a peer died (gloo raises RuntimeError): the
        # group is being torn down and relaunched, and nothing can be saved. Report it, then skip
        # the interpreter's torch teardown, which measured 0.4 s of every recovery.
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_CRASHED)
    return 0
