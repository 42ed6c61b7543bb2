"""The daemon's long-lived background tasks outlive their own bugs.

A task that dies of an exception nobody awaits dies silently: the output emitter would stop
logging (and with it the progress it reads), the status ticker would stop reaping, the
multi-node helper's reader would stop hearing the rendezvous. :func:`resilient` runs such a
task's body again after an unforeseen exception, says so (``task_failed``, with where it was
raised), and waits a little longer after each failure, so that a bug hit on every turn costs
a line a second, not a busy loop.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

RETRY_FIRST = 0.01  # seconds before the body runs again after its first failure
RETRY_MAX = 1.0  # doubling up to this


def start(name: str, body: Callable[[], Awaitable[None]], log: Any) -> asyncio.Task[None]:
    """A task named ``name`` that runs :func:`resilient` ``body``."""
    return asyncio.create_task(resilient(name, body, log), name=name)


async def resilient(name: str, body: Callable[[], Awaitable[None]], log: Any) -> None:
    """Await ``body()`` until it returns or the task is cancelled; run it again after any other
    exception (the failures a body expects, it handles itself)."""
    failures = 0
    while True:
        try:
            await body()
            return
        except Exception as exc:  # CancelledError is a BaseException: it ends the task
            failures += 1
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("task_failed", task=name, failures=failures, reason=f"{type(exc).__name__}: {exc}",
                      where=f"{frame.filename}:{frame.lineno} in {frame.name}")
            await asyncio.sleep(min(RETRY_FIRST * 2 ** (failures - 1), RETRY_MAX))
