"""The contract between the supervisor and any training script: what it is told, what it says, how it stops.

Torch-free, so a script pays nothing to import it. The supervisor starts every rank with the
torchrun variables plus its own ``SUPERVISORD_FT_*`` ones, read once into :class:`SupervisorEnv`.
Everything a script tells the supervisor is one JSON object per stdout line with an ``"event"``
key: the daemon merges these lines into its log events and counts ``step`` events as progress.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from supervisord_ft import envvars
from supervisord_ft.builtin_job import KEEP_CHECKPOINTS as DEFAULT_KEEP_CHECKPOINTS
from supervisord_ft.errors import ConfigError
from supervisord_ft.jsonline import dumps


@dataclass(frozen=True)
class SupervisorEnv:
    """What the supervisor tells each rank. Unset torchrun variables mean one local process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    torchelastic_restart_count: int = 0
    restart_count: int = 0
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None  # None on a fresh start
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SupervisorEnv:
        """Read and validate the variables; a bad value raises :class:`ConfigError` naming it."""
        env = cls(
            rank=_int(environ, envvars.RANK, 0),
            local_rank=_int(environ, envvars.LOCAL_RANK, 0),
            world_size=_int(environ, envvars.WORLD_SIZE, 1, minimum=1),
            local_world_size=_int(environ, envvars.LOCAL_WORLD_SIZE, 1, minimum=1),
            master_addr=environ.get(envvars.MASTER_ADDR) or None,
            master_port=_int(environ, envvars.MASTER_PORT, 0, minimum=1) or None,
            torchelastic_restart_count=_int(environ, envvars.TORCHELASTIC_RESTART_COUNT, 0),
            restart_count=_int(environ, envvars.RESTART_COUNT, 0),
            checkpoint_dir=_path(environ, envvars.CHECKPOINT_DIR),
            resume_from=_path(environ, envvars.RESUME_FROM),
            keep_checkpoints=_int(environ, envvars.KEEP_CHECKPOINTS, DEFAULT_KEEP_CHECKPOINTS, minimum=1),
        )
        if env.rank >= env.world_size:
            raise ConfigError(f"RANK={env.rank} must be below WORLD_SIZE={env.world_size}")
        return env


def _int(environ: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
    raw = environ.get(key)
    if not raw:
        return default
    try:
        value = int(raw)
        if value >= minimum:
            return value
    except ValueError:
        pass
    raise ConfigError(f"{key}={raw!r}: expected an integer >= {minimum}")


def _path(environ: Mapping[str, str], key: str) -> Path | None:
    raw = environ.get(key)
    return Path(raw) if raw else None


def emit(event: str, **fields: Any) -> None:
    """Write ``{"event": event, **fields}`` as one strict JSON line (a NaN loss becomes ``null``
    plus ``loss_nonfinite: "nan"``, see :mod:`supervisord_ft.jsonline`) and flush, so the
    supervisor sees it now."""
    sys.stdout.write(dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def report_progress(step: int, **fields: Any) -> None:
    """Report a completed step; the supervisor's hang watchdog counts these lines as progress."""
    emit("step", step=step, **fields)


class StopFlag:
    """Turns SIGTERM into a request to stop at the next step boundary.

    The handler only records the request. It also restores the default action, so a second
    SIGTERM kills the process at once (status 143, ``Popen.returncode == -15``) even while it is
    blocked inside a collective, where no Python-level handler could run.
    """

    def __init__(self) -> None:
        self._requested = False

    @property
    def requested(self) -> bool:
        return self._requested

    def install(self) -> StopFlag:
        """Take over SIGTERM (main thread only, as for any Python signal handler)."""
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class CheckpointRequest:
    """Turns SIGUSR1 and SIGUSR2 into a request to save a checkpoint at the next step boundary,
    then keep training.

    SLURM's ``--signal=USR1@T`` pre-timeout warning and a Kubernetes preStop hook reach the
    supervisor, which sends the signal on to every rank that has a handler for it (a rank without
    one would be killed by the default action, so it is not sent one). Installing this is how a
    script says it has one.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self._requested = False

    def install(self) -> CheckpointRequest:
        """Take over SIGUSR1 and SIGUSR2 (main thread only)."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def take(self) -> bool:
        """True once per request: the caller saves now."""
        requested, self._requested = self._requested, False
        return requested

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True
