"""14. ``status`` and ``report`` on a multi-day run's log: time and memory against its size.

A synthetic ``events.jsonl`` in the daemon's own line format (its encoder, its key order): 8
ranks; each step, rank 0 prints its JSON step report and every rank one plain line (a
``print(f"loss {loss}")``); rank 3 prints a warning on stderr every 100 steps; a checkpoint
every 500 steps; a crash and a recovery every ``CRASH_EVERY`` steps. Each command runs in a
process of its own (its peak RSS from ``wait4``), against the floor of reading the file's lines
at all (``python`` iterating over the file: the disk and the line splitting, nothing decoded).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from supervisord_ft.jsonline import encoder

from .report import Result, Table

NAME = "status_log"
RANKS = 8
CRASH_EVERY = 20_000  # steps
STEP_SECONDS = 0.05
RUN_ID = "20261206T000000Z-b3n5h0"
T0 = datetime(2026, 12, 6, tzinfo=timezone.utc)
COMMANDS = {
    "read every line (floor)": "import sys\nfor line in open(sys.argv[1], 'rb', buffering=1 << 20): pass",
    "status": "import sys\nfrom supervisord_ft.cli import main\nsys.exit(main(['status', sys.argv[2]]))",
    "status --json": "import sys\nfrom supervisord_ft.cli import main\nsys.exit(main(['status', sys.argv[2], '--json']))",
    "every line decoded (report's read)": "import sys\nfrom pathlib import Path\nfrom supervisord_ft import runlog\n"
                                          "runlog.summarise(runlog.read(Path(sys.argv[2])))",
}


def write_log(path: Path, size: int) -> int:
    """Write a run of about ``size`` bytes to ``path``; return its line count."""
    dumps = encoder()
    lines = 0
    t = 0.0

    def event(name: str, level: str = "info", **fields: Any) -> str:
        stamp = (T0 + timedelta(seconds=t)).isoformat().replace("+00:00", "Z")
        return dumps({"timestamp": stamp, "level": level, "event": name, "run_id": RUN_ID, **fields}) + "\n"

    def output(rank: int, attempt: int, stream: str, **fields: Any) -> str:
        return event("worker_output", rank=rank, restart=attempt, attempt=attempt, stream=stream, **fields)

    with open(path, "w", buffering=1 << 20) as fh:
        out: list[str] = [event("supervisor_start", pid=1, host="elsewhere", config={"num_workers": RANKS}),
                          event("checkpoint_selected", path=None, step=None, reason="starting fresh")]
        attempt, step, resumed = 0, 0, 0
        while fh.tell() < size:
            if step == resumed:
                out += [event("launching", restart=attempt, attempt=attempt, resume_from=None if not step
                              else f"/ckpt/checkpoint_step_{step}.pt")]
                out += [event("worker_started", rank=r, restart=attempt, attempt=attempt, pid=100 + r)
                        for r in range(RANKS)]
                out.append(event("state_changed", attempt=attempt, **{"from": "LAUNCHING", "to": "RUNNING"}))
            step += 1
            t += STEP_SECONDS
            out.append(output(0, attempt, "stdout", worker_event="step", worker_step=step, loss=1.0 / step))
            out += [output(r, attempt, "stdout", line=f"step {step} loss {1.0 / step:.6f}") for r in range(RANKS)]
            if step % 100 == 0:
                out.append(output(3, attempt, "stderr", line="UserWarning: a deprecation, as every 100 steps"))
            if step % 500 == 0:
                out.append(output(0, attempt, "stdout", worker_event="checkpoint_saved", worker_step=step,
                                  worker_path=f"/ckpt/checkpoint_step_{step}.pt"))
            if step % CRASH_EVERY == 0:
                out += [output(5, attempt, "stderr", line="RuntimeError: a fault"),
                        event("worker_exited", rank=5, restart=attempt, attempt=attempt, pid=105, returncode=1),
                        event("state_changed", attempt=attempt, reason="rank 5 exited with 1",
                              **{"from": "RUNNING", "to": "RECOVERING"})]
                attempt, resumed = attempt + 1, step - step % 500
                step = resumed
            lines += len(out)
            fh.write("".join(out))
            out.clear()
    return lines


def measure(code: str, log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python -c code LOG RUN_DIR``."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, str(log), str(log.parent)], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{proc.args[:3]} exited {code}")
    return seconds, usage.ru_maxrss / 1024


async def run(quick: bool) -> Result:
    sizes = [32 << 20] if quick else [256 << 20, 1 << 30]
    table = Table("`status` on a long run's events.jsonl: wall time (s) and peak memory (MiB)",
                  ["log", "lines", *(f"{name} s / MiB" for name in COMMANDS), "status / floor"])
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sft-status-") as tmp:
        log = Path(tmp) / "events.jsonl"
        for size in sizes:
            lines = await asyncio.to_thread(write_log, log, size)
            m = data[str(size)] = {name: await asyncio.to_thread(measure, code, log) for name, code in COMMANDS.items()}
            m["lines"] = lines
            table.add(f"{log.stat().st_size / (1 << 20):,.0f} MiB", f"{lines:,}",
                      *(f"{m[name][0]:.2f} / {m[name][1]:.0f}" for name in COMMANDS),
                      f"{m['status'][0] / m['read every line (floor)'][0]:.2f}")
    table.notes.append(f"{RANKS} ranks, rank 0 reporting each step, every rank printing a line a step; a crash every "
                       f"{CRASH_EVERY:,} steps. One run per cell; the floor only iterates over the lines.")
    return Result(NAME, [table], data)
