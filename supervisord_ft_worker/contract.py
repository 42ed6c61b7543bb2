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
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
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


_EMIT_LOCK = threading.Lock()  # a background checkpoint writer emits too: lines never interleave


def emit(event: str, **fields: Any) -> None:
    """Write ``{"event": event, **fields}`` as one strict JSON line (a NaN loss becomes ``null``
    plus ``loss_nonfinite: "nan"``, see :mod:`supervisord_ft.jsonline`) and flush, so the
    supervisor sees it now."""
    line = dumps({"event": event, **fields}) + "\n"
    with _EMIT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def exit_now(code: int) -> None:
    """Flush what was printed, then exit at once without Python's teardown.

    For a rank whose process group is broken: torch's interpreter teardown measured 0.4 s of
    every recovery, and a slow exit lets a peer's failure be reported before this one's cause.
    """
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


class SaveOnFailure:
    """On a failed collective, call ``save`` once, then exit: a crash of a peer costs no completed step.

    Wrap the collectives of a step in ``with guard:`` (one guard serves every step). When a peer
    dies, gloo raises ``RuntimeError`` in the collective within tens of milliseconds, before this
    step's update is applied: the state is that of the last completed step, complete without the
    dead rank's. ``save`` writes it (``checkpoint_step_<last completed step>.pt``, with
    ``exclusive=True`` so that survivors saving the same step at once cannot clash); then the
    process exits with ``exit_code`` at once (:func:`exit_now`). A failed ``save`` is reported
    (``jit_checkpoint_failed``) and the exit is the same: recovery then resumes from the newest
    periodic checkpoint. Its first ``with`` prints ``jit_checkpoint_armed``; the supervisor gives
    survivors that printed it ``jit_checkpoint_timeout`` seconds to get there before it signals
    them (others are signalled at once). Other exceptions pass through untouched.
    """

    def __init__(self, save: Callable[[], object], exit_code: int = 1,
                 errors: tuple[type[BaseException], ...] = (RuntimeError,)) -> None:
        self.save = save
        self.exit_code = exit_code
        self.errors = errors
        self._armed = False

    def __enter__(self) -> SaveOnFailure:
        if not self._armed:  # the supervisor now waits for this rank's save when a peer dies
            emit("jit_checkpoint_armed")
            self._armed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, self.errors):
            return False
        traceback.print_exception(exc)
        started = time.monotonic()
        try:
            saved = self.save()
        except Exception as error:  # reported; the newest periodic checkpoint stands
            emit("jit_checkpoint_failed", error=f"{type(error).__name__}: {error}",
                 seconds=round(time.monotonic() - started, 4))
        else:
            emit("jit_checkpoint", path=str(saved) if saved is not None else None,
                 seconds=round(time.monotonic() - started, 4))
        exit_now(self.exit_code)
        return False  # not reached


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
