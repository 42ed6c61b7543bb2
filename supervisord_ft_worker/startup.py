"""Where a rank's start-up goes: process start, interpreter, imports, checkpoint load, rendezvous, first step.

A relaunched group's recovery time is mostly its ranks' start-up, and which phase dominates
decides what to make faster (a warm process pool for imports, a faster load, a quicker
rendezvous). Torch-free, and imported by ``python -m supervisord_ft_worker`` before anything else, so its clock
starts before torch is imported. Marks are wall-clock (``time.time()``): they line up with the
supervisor's event timestamps and with other processes' marks on the same machine.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from supervisord_ft import procfs


def process_start_time() -> float:
    """Wall-clock time the kernel created this process, to a clock tick (10 ms on most kernels);
    in a warm standby, when it was handed its rank: its interpreter and imports were paid ahead."""
    if (standby := sys.modules.get("supervisord_ft_standby.runner")) is not None and standby.ACTIVATED_AT:
        return standby.ACTIVATED_AT
    stat = procfs.stat()
    assert stat is not None  # our own process
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - stat.start_ticks / procfs.CLK_TCK
    return time.time() - age


class StartupClock:
    """Marks phases as they end; :meth:`report` gives each phase's seconds, in order."""

    def __init__(self) -> None:
        self.process_start = process_start_time()
        self.marks: dict[str, float] = {"interpreter": time.time()}

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.time()

    def report(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"process_start": round(self.process_start, 6)}
        before = self.process_start
        for phase, at in self.marks.items():
            fields[f"{phase}_s"] = round(at - before, 4)
            before = at
        return fields


CLOCK = StartupClock()
