"""A rank that describes itself: run cold and from a standby, its report must be the same.

Prints one JSON line of everything a script could look at (argv, ``__main__``, sys.path[0],
cwd, environment, signal dispositions, session, parent-death signal, stdin), then, on the first
attempt only, waits for one byte on ``PROBE_GO`` (a FIFO the test holds) so that the test can let
the standby pool fill first, then ends as ``PROBE_END`` says: ``raise``, or ``exit N``. When that
is a failure, only rank 1 fails and rank 0 waits to be terminated, so that each attempt ends the
same way whatever the scheduling.
"""

import atexit
import ctypes
import json
import os
import signal
import sys

import __main__

PER_ATTEMPT = ("MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "SUPERVISORD_FT_RESTART_COUNT",
               "SUPERVISORD_FT_CHANNEL", "TORCHELASTIC_ERROR_FILE")


def status_masks() -> dict[str, str]:
    with open("/proc/self/status") as fh:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in fh)
                if k in ("SigBlk", "SigIgn", "SigCgt")}


deathsig = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(deathsig))  # PR_GET_PDEATHSIG
print(json.dumps({
    "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0], "name": __name__,
    "file": __file__, "main": sorted(vars(__main__)), "spec": __spec__ and [__spec__.name, __spec__.origin], "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k not in PER_ATTEMPT},
    "handlers": {s.name: repr(signal.getsignal(s)) for s in signal.valid_signals() if isinstance(s, signal.Signals)
                 and s not in (signal.SIGKILL, signal.SIGSTOP)},
    "masks": status_masks(), "session_leader": os.getsid(0) == os.getpid(),
    "group_leader": os.getpgid(0) == os.getpid(), "deathsig": deathsig.value,
    "stdin": os.readlink("/proc/self/fd/0"), "stdout": os.readlink("/proc/self/fd/1")[:5],
}), flush=True)


class Teardown:
    """Says so when the interpreter's teardown frees it (a failed rank's fast exit skips that)."""

    def __del__(self, write=os.write) -> None:
        write(2, b"teardown\n")


teardown = Teardown()
atexit.register(os.write, 2, b"atexit\n")  # stderr, the traceback's stream: one order
end = os.environ["PROBE_END"].split()
if end != ["exit", "0"] and os.environ["RANK"] == "0":
    signal.pause()  # until the teardown's SIGTERM
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:  # exactly one byte each
        go.read(1)
if end[0] == "raise":
    raise ValueError(f"rank {os.environ['RANK']} fails")
print("exiting", file=sys.stderr, flush=True)
sys.exit(int(end[1]))
