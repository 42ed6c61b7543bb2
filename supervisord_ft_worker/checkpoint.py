"""Training state in and out of the supervisor's checkpoint files.

Naming, atomic writes, verification and retention belong to :mod:`supervisord_ft.checkpoints`
(torch-free, shared with the daemon); this module adds only torch serialisation. Loads use
``weights_only=True``, so a state may hold tensors and primitive containers only, and a crafted
file cannot run code.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from supervisord_ft.checkpoints import atomic_write, checkpoint_path, discover, prune, verify
from supervisord_ft.errors import CheckpointError

from .contract import SupervisorEnv, emit


def save_checkpoint(
    state: dict[str, Any],
    step: int,
    directory: Path | str,
    *,
    keep: int | None = None,
    protect: Iterable[Path] | None = None,
    exclusive: bool = False,
    abandon: threading.Event | None = None,
) -> Path:
    """Write ``state`` as ``checkpoint_step_<step>.pt``, then delete all but the ``keep`` newest.

    The name appears only once the file is complete and durable. ``keep`` and ``protect`` default
    to the supervisor's SUPERVISORD_FT_KEEP_CHECKPOINTS and resume file: the file this attempt
    resumed from is never deleted under it. ``exclusive``: an existing file of that step wins
    (ranks saving one step at once). A write whose ``abandon`` is set by the time it is
    complete raises :class:`SaveAbandoned` and its temporary is removed, never named. Prints a
    ``checkpoint_saved`` event.
    """
    started = time.monotonic()
    if keep is None or protect is None:
        env = SupervisorEnv.from_env()
        keep = env.keep_checkpoints if keep is None else keep
        protect = ([env.resume_from] if env.resume_from else []) if protect is None else protect
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    def write(fh: BinaryIO) -> None:
        # By path, not through ``fh``: torch's own file writer runs mostly without the GIL, its
        # writer of Python file objects holds it throughout (a training thread beside a
        # background save got 72% of its time against 35%). atomic_write fsyncs the same inode.
        try:
            torch.save(state, fh.name)
        except RuntimeError:
            _raise_disk_error(fh.name)
            raise
        if abandon is not None and abandon.is_set():
            raise SaveAbandoned(f"checkpoint of step {step} abandoned")

    path = atomic_write(checkpoint_path(directory, step), write, exclusive=exclusive)
    prune(directory, keep, protect, written=path)
    emit("checkpoint_saved", step=step, path=str(path), seconds=round(time.monotonic() - started, 4))
    return path


class SaveAbandoned(Exception):
    """A write given up on purpose (see ``abandon``); no file was named."""


def _raise_disk_error(path: str) -> None:
    """torch's file writer reports a failed write as an assertion ("unexpected pos"), losing
    errno: append one byte to find out whether the disk (full, a file-size limit, I/O) is why."""
    with open(path, "ab") as fh:
        fh.write(b"\0")
        fh.flush()


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a state written by :func:`save_checkpoint`; :class:`CheckpointError` if it is unusable.

    The file is verified first (zip CRCs), because torch's loader would happily unpickle a
    corrupted file into wrong numbers.
    """
    path = Path(path)
    try:
        verify(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path} {exc}") from None
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} holds objects a weights-only load refuses: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


def newest_checkpoint(directory: Path | str) -> Path | None:
    """The newest intact checkpoint in ``directory``, or None: how a rank resumes when no supervisor
    names the file (under torchrun). Each skipped file is reported as a ``checkpoint_rejected`` event."""
    found = discover(directory)
    for bad in found.rejected:
        emit("checkpoint_rejected", path=str(bad.path), reason=bad.reason)
    return found.newest.path if found.newest is not None else None
