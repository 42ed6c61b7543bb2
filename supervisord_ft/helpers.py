"""Torch helper processes beside the daemon (``python -m supervisord_ft_standby.<name>``): started and ended
one way, whichever protocol they speak.

A helper runs in its own session, dies with the daemon (the parent-death signal), and is counted
in :data:`orphans.HELPERS` while it lives, so the orphan sweep leaves it alone.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import signal
import tempfile
from pathlib import Path

from . import orphans
from .workers import KILL_TIMEOUT, _die_with_parent, signal_group

PACKAGE = Path(__file__).resolve().parent.parent / "supervisord_ft_standby"  # the torch side


@functools.cache
def import_root() -> str:
    """A directory that holds our torch-side package alone (a link to it): the working directory
    of every ``python -m supervisord_ft_standby...`` started, so that the job's interpreter finds
    that package there and nothing else of the daemon's installation, whose site-packages may
    hold another torch than the job's (the daemon installed apart, with pipx or a venv)."""
    root = tempfile.mkdtemp(prefix="sft-py-")
    os.symlink(PACKAGE, os.path.join(root, PACKAGE.name))
    atexit.register(shutil.rmtree, root, True)
    return root


async def start(python: str, module: str, *args: str) -> asyncio.subprocess.Process:
    """Start ``python -m module args`` with pipes on stdin and stdout; OSError if it cannot."""
    proc = await asyncio.create_subprocess_exec(
        python, "-m", module, *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, cwd=import_root(), start_new_session=True,
        preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    orphans.HELPERS.add(proc.pid)
    return proc


async def stop(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL the helper's group if it still runs, and reap it."""
    if proc is None:
        return
    orphans.HELPERS.discard(proc.pid)
    if proc.returncode is None:
        signal_group(proc.pid, signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), KILL_TIMEOUT)
