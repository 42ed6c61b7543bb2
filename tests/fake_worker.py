"""A torch-free stand-in for a training script, for fast supervisor tests.

Behaviour comes from command-line flags; rank and attempt come from the supervisor's
environment, so one command line can make rank 1 of attempt 0 fail while all else succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import zipfile

from supervisord_ft import checkpoints, envvars


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def flood(lines: int, rate: int, rank: int) -> None:
    """Print ``lines`` lines at ``rate`` lines/s with non-blocking writes; report every time the
    pipe was full (EAGAIN), i.e. every time the supervisor would have blocked us. The count is
    fixed and the rate a ceiling, so a loaded machine slows the flood down but never shortens it."""
    fd = sys.stdout.fileno()
    os.set_blocking(fd, False)
    full = sent = 0
    blocked = 0.0
    batch = 1000
    line = b"flood line from rank %d, padding to a typical log line length ......\n" % rank
    t0 = time.monotonic()
    while sent < lines:
        if sent > (time.monotonic() - t0) * rate:
            time.sleep(batch / rate / 4)
            continue
        data = line * batch
        while data:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                full += 1
                t_block = time.monotonic()
                select.select([], [fd], [], 1.0)
                blocked += time.monotonic() - t_block
        sent += batch
    os.set_blocking(fd, True)
    # A file, not stdout: after a flood the daemon may rightly drop a few lines, this one too.
    with open(f"flood-{rank}.json", "w") as fh:
        json.dump({"rank": rank, "lines": sent, "pipe_full": full, "blocked": round(blocked, 3),
                   "seconds": round(time.monotonic() - t0, 3)}, fh)


def save(step: int) -> None:
    """A checkpoint as a script that knows no better writes it: no temporary, straight to the
    final name, with nothing said. torch.save's shape without tensors: data.pkl in an archive."""
    path = checkpoints.checkpoint_path(os.environ[envvars.CHECKPOINT_DIR], step)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": step}))


SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def spawn_detached() -> int:
    """Start a sleeper the way a daemon detaches: its parent exits at once, so it is orphaned
    while the worker still runs, in a session and process group of its own."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        sleeper = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        os.write(w, b"%d" % sleeper.pid)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        pid = int(pipe.read())
    os.waitpid(middle, 0)
    return pid


def progress_bar(seconds: float) -> None:
    """A tqdm-style bar on stderr: redrawn after a carriage return 20 times a second, no newline
    until it is complete."""
    t0 = time.monotonic()
    while (done := (time.monotonic() - t0) / seconds) < 1:
        print(f"\r{done:4.0%}|{'#' * int(done * 20):20}|", end="", file=sys.stderr, flush=True)
        time.sleep(0.05)
    print(f"\r100%|{'#' * 20}|", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-time", type=float, default=0.0)
    p.add_argument("--startup-delay", type=float, default=0.0, help="silence before any output")
    p.add_argument("--fail-rank", type=int, default=None)
    p.add_argument("--fail-at-step", type=int, default=0, help="0: before the first step")
    p.add_argument("--fail-code", type=int, default=1)
    p.add_argument("--fail-attempts", type=int, default=1, help="attempts (from 0) that fail")
    p.add_argument("--hang", action="store_true", help="the failing rank hangs instead of exiting")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--survivor-save", type=float, default=None, metavar="S",
                   help="when the failing rank fails, the others spend S seconds writing "
                        "jit-<rank> (SIGTERM kills them meanwhile), then exit 1: survivors of "
                        "a dead peer saving a just-in-time checkpoint")
    p.add_argument("--arm-jit", action="store_true",
                   help="print jit_checkpoint_armed, as supervisord_ft_worker.contract.SaveOnFailure does")
    p.add_argument("--spawn-child", nargs="?", const="group", choices=["group", "detached"],
                   help="fork a sleeping grandchild: in the worker's process group, or detached "
                        "from it as daemons do (double fork, setsid, stdio on /dev/null)")
    p.add_argument("--flood", type=int, default=0, help="print this many lines first")
    p.add_argument("--flood-lines", type=int, default=0, help="print this many lines, paced")
    p.add_argument("--flood-rate", type=int, default=200_000, help="lines per second")
    p.add_argument("--flood-attempts", type=int, default=None, help="attempts (from 0) that flood")
    p.add_argument("--long-line", type=int, default=0, help="print one line of this many bytes")
    p.add_argument("--binary", action="store_true", help="print invalid UTF-8 and NUL bytes")
    p.add_argument("--print-env", action="store_true", help="print the supervisor's variables")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="rank 0 saves every N steps; steps then count on from the resume file's")
    p.add_argument("--catch-usr1-rank", type=int, default=None,
                   help="this rank handles SIGUSR1 (reports it at its next step); others do not")
    p.add_argument("--plain", action="store_true",
                   help="report steps as plain text, as an unmodified torchrun script does")
    p.add_argument("--refuse-checkpoint", default=None, metavar="NAME",
                   help="exit 2 at start when resuming from the checkpoint of this file name "
                        "(`any`: from any checkpoint)")
    p.add_argument("--silent-rank", type=int, default=None,
                   help="this rank prints nothing, and after its last step lingers --linger seconds")
    p.add_argument("--linger", type=float, default=0.0)
    p.add_argument("--progress-bar", type=float, default=0.0,
                   help="after step 1, redraw a progress bar on stderr for this many seconds")
    args = p.parse_args()

    rank = int(os.environ[envvars.RANK])
    attempt = int(os.environ[envvars.RESTART_COUNT])
    stop = False

    def on_term(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_sigterm else on_term)
    usr1 = 0

    def on_usr1(signum, frame):
        nonlocal usr1
        usr1 += 1

    if rank == args.catch_usr1_rank:
        signal.signal(signal.SIGUSR1, on_usr1)
    time.sleep(args.startup_delay)
    if args.spawn_child == "group":
        child = subprocess.Popen(SLEEPER)
        emit("child", pid=child.pid)
    elif args.spawn_child == "detached":
        emit("child", pid=spawn_detached())
    out = sys.stdout.buffer
    if args.long_line:  # before any flood, which may fill the daemon's backlog for a while
        out.write(b"x" * args.long_line + b"\nafter long line\n")
        out.flush()
    if args.binary:
        out.write(b"bad \xff\xfe utf8 \x00 nul\n{not json\n")
        out.flush()
    if args.flood:
        out.write(b"".join(b"flood line %d from rank %d\n" % (i, rank) for i in range(args.flood)))
        out.flush()
    if args.flood_lines and (args.flood_attempts is None or attempt < args.flood_attempts):
        flood(args.flood_lines, args.flood_rate, rank)
    if args.print_env:
        emit("env", env={k: v for k, v in os.environ.items() if k in envvars.ALL})
    resume = os.environ.get(envvars.RESUME_FROM)
    if resume and args.refuse_checkpoint in ("any", os.path.basename(resume)):
        print(f"cannot resume from {os.path.basename(resume)}: not a state of this job",
              file=sys.stderr, flush=True)
        return 2
    fault = args.fail_rank is not None and attempt < args.fail_attempts
    failing = fault and rank == args.fail_rank
    if args.arm_jit:
        emit("jit_checkpoint_armed")
    start = (checkpoints.parse_step(os.path.basename(resume)) or 0) if resume and args.save_every else 0
    for step in range(start + 1, start + args.steps + 1):
        if failing and step - 1 == args.fail_at_step:
            print(f"rank {rank} failing at step {step - 1}", file=sys.stderr, flush=True)
            if args.hang:
                time.sleep(3600)
            return args.fail_code
        if stop:
            emit("stopped", step=step - 1)
            return 0
        if fault and args.survivor_save is not None and step - 1 == args.fail_at_step:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a script that does not catch it
            time.sleep(args.survivor_save)  # the write itself
            with open(f"jit-{rank}", "w"):
                pass
            return 1
        if usr1:
            emit("usr1", count=usr1)
            usr1 = 0
        time.sleep(args.step_time)
        if rank == args.silent_rank:
            continue
        if args.plain:
            print(f"step {step}", flush=True)
        else:
            emit("step", step=step, rank=rank)
        if args.save_every and rank == 0 and step % args.save_every == 0:
            save(step)
        if step == 1 and args.progress_bar:
            progress_bar(args.progress_bar)
    if rank == args.silent_rank:
        time.sleep(args.linger)  # finishing up (destroy_process_group, a last save), silent
    return 0


if __name__ == "__main__":
    sys.exit(main())
