"""Torch helper processes beside the daemon (``python -m supervisord_ft_standby.<name>``): started and ended
one way, whichever protocol they speak.

A helper runs in its own session, dies with the daemon (the parent-death signal), and is counted
in :data:`orphans.HELPERS` while it lives, so the orphan sweep leaves it alone.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal

from . import orphans
from .standby import PACKAGE_ROOT
from .workers import KILL_TIMEOUT, _die_with_parent, signal_group


async def start(python: str, module: str, *args: str) -> asyncio.subprocess.Process:
    """Start ``python -m module args`` with pipes on stdin and stdout; OSError if it cannot."""
    proc = await asyncio.create_subprocess_exec(
        python, "-m", module, *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, cwd=PACKAGE_ROOT, start_new_session=True,
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
