"""A torch-free stand-in for a training script, for fast supervisor tests.

Behaviour comes from command-line flags; rank and attempt come from the supervisor's
environment, so one command line can make rank 1 of attempt 0 crash while all else succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ENV_KEYS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
            "SUPERVISORD_FT_RESTART_COUNT", "SUPERVISORD_FT_CHECKPOINT_DIR",
            "SUPERVISORD_FT_RESUME_FROM", "SUPERVISORD_FT_KEEP_CHECKPOINTS", "PYTHONUNBUFFERED"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-time", type=float, default=0.0)
    p.add_argument("--fail-rank", type=int, default=None)
    p.add_argument("--fail-at-step", type=int, default=0, help="0: before the first step")
    p.add_argument("--fail-code", type=int, default=1)
    p.add_argument("--fail-attempts", type=int, default=1, help="attempts (from 0) that fail")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--spawn-child", action="store_true", help="fork a sleeping grandchild")
    p.add_argument("--flood", type=int, default=0, help="print this many lines first")
    p.add_argument("--long-line", type=int, default=0, help="print one line of this many bytes")
    p.add_argument("--binary", action="store_true", help="print invalid UTF-8 and NUL bytes")
    p.add_argument("--print-env", action="store_true", help="print the supervisor's variables")
    args = p.parse_args()

    rank = int(os.environ["RANK"])
    attempt = int(os.environ["SUPERVISORD_FT_RESTART_COUNT"])
    stop = False

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else on_term)
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(json.dumps({"event": "child", "pid": child.pid}), flush=True)
    out = sys.stdout.buffer
    if args.flood:
        out.write(b"".join(b"flood line %d from rank %d\n" % (i, rank) for i in range(args.flood)))
        out.flush()
    if args.long_line:
        out.write(b"x" * args.long_line + b"\nafter long line\n")
        out.flush()
    if args.binary:
        out.write(b"bad \xff\xfe utf8 \x00 nul\n{not json\n")
        out.flush()
    if args.print_env:
        print(json.dumps({"event": "env", "env": {k: v for k, v in os.environ.items() if k in ENV_KEYS}}),
              flush=True)
    failing = rank == args.fail_rank and attempt < args.fail_attempts
    if failing and args.fail_at_step == 0:
        return args.fail_code
    for step in range(1, args.steps + 1):
        if stop:
            print(json.dumps({"event": "stopped", "step": step - 1}), flush=True)
            return 0
        time.sleep(args.step_time)
        print(json.dumps({"event": "step", "step": step, "rank": rank}), flush=True)
        if failing and step == args.fail_at_step:
            print(f"rank {rank} failing at step {step}", file=sys.stderr, flush=True)
            return args.fail_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
