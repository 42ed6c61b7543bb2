"""An exclusive lock on the checkpoint directory, held for the daemon's life.

Two daemons on one ``checkpoint_dir`` (a job started twice by mistake) would resume from and
prune each other's checkpoints. The lock is ``flock`` on a file inside the directory: the
kernel releases it when the daemon exits however it dies, so a stale lock cannot block a
re-run. The file holds the holder's pid, for the refusal message only. It is never deleted:
unlinking a lock file lets a third daemon lock a fresh inode while a second still holds the old
one. Its descriptor is close-on-exec, so workers never inherit (and never extend) the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError

LOCK_NAME = ".supervisord-ft.lock"  # not a checkpoint name: discovery and pruning never see it


@contextlib.contextmanager
def hold(key: str, directory: Path) -> Iterator[None]:
    """Hold the lock on ``directory`` (which must exist) while the block runs.

    Raises :class:`ConfigError` naming the directory and the holder's pid when another
    process holds it.
    """
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot open the lock file {str(path)!r}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(f"{key}: {str(directory)!r} is in use by another supervisord-ft "
                              f"(pid {holder}); stop it or choose another {key}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
