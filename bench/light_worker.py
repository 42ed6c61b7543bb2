"""A torch-free worker for the benchmarks that measure the launcher rather than the training.

It starts in tens of milliseconds instead of seconds, so detection, teardown, output and scale
numbers are the launcher's own. Every line is one JSON event carrying the wall-clock ``time`` it
was printed at and the ``rank``, ``attempt`` and ``pid`` read from the torchrun environment that
both launchers set. Its first line is a ``step`` event, so our daemon counts the attempt as
progress and never mistakes a benchmark's repeated failures for a crash loop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

from supervisord_ft import envvars

BATCH = 100  # flood lines per write: one timestamp per batch keeps the worker well ahead of the daemon


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--exit-rank", type=int, default=None, help="this rank exits on every attempt")
    p.add_argument("--exit-after", type=float, default=0.3, help="seconds after start")
    p.add_argument("--exit-jitter", type=float, default=0.0, help="plus up to this many seconds, at random")
    p.add_argument("--exit-code", type=int, default=1)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--flood-lines", type=int, default=0, help="print this many lines, then exit 0")
    p.add_argument("--flood-rate", type=float, default=10_000.0, help="lines per second")
    p.add_argument("--flood-batch", type=int, default=BATCH,
                   help="lines per write (1: a line per print, as a training log is written)")
    p.add_argument("--hold", type=float, default=600.0, help="seconds to live when nothing else ends it")
    args = p.parse_args()

    rank = int(os.environ[envvars.RANK])
    attempt = max(int(os.environ.get(k) or 0) for k in (envvars.RESTART_COUNT, envvars.TORCHELASTIC_RESTART_COUNT))

    def emit(event: str, **fields: object) -> None:
        line = json.dumps({"event": event, "rank": rank, "attempt": attempt, "pid": os.getpid(),
                           "time": time.time(), **fields})
        os.write(1, line.encode() + b"\n")

    def on_sigterm(signum: int, frame: object) -> None:
        emit("sigterm")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else on_sigterm)
    emit("step", step=1)
    if args.flood_lines:
        flood(args.flood_lines, args.flood_rate, args.flood_batch)
        emit("flood_done", lines=args.flood_lines)
        return 0
    if rank == args.exit_rank:
        time.sleep(args.exit_after + random.uniform(0, args.exit_jitter))
        emit("exiting", code=args.exit_code)
        os._exit(args.exit_code)
    time.sleep(args.hold)
    return 0


def flood(lines: int, rate: float, batch: int = BATCH) -> None:
    """Print ``lines`` short JSON lines at ``rate`` per second, ``batch`` per write, each stamped
    with its write time."""
    start = time.time()
    for first in range(0, lines, batch):
        due = start + first / rate
        if (ahead := due - time.time()) > 0:
            time.sleep(ahead)
        t = time.time()
        os.write(1, "".join(f'{{"event":"tick","i":{i},"t":{t:.6f}}}\n'
                            for i in range(first, min(first + batch, lines))).encode())


if __name__ == "__main__":
    sys.exit(main())
