"""``supervisord-ft rdzv-store HOST[:PORT]``: a job's rendezvous store as a service of its own.

By default the rendezvous store lives in the rendezvous helper of the node whose address the
endpoint is: if that node dies, the others cannot form the next round (torch's open problem,
pytorch/pytorch#150916). Run apart from training (a head or login node, under systemd or any
supervisor), this store belongs to no training node: every node's daemon joins it as a client,
so any of them may die and, with ``--nnodes MIN:MAX``, the others go on without it.

The daemon stays torch-free: the store is served by ``python -m supervisord_ft_standby.rdzv_store``
(the job's interpreter, found as ``run``'s), a child that dies with this process; the stop
signals are passed on to it, and its exit status is this command's.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess

from . import helpers, torchrun
from .config import endpoint_parts
from .errors import EXIT_SIGNAL_BASE
from .workers import _die_with_parent

MODULE = "supervisord_ft_standby.rdzv_store"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(endpoint: str) -> int:
    """Serve the store at ``endpoint`` until a stop signal; its JSON lines go to stdout."""
    host, port = endpoint_parts(endpoint)
    proc = subprocess.Popen([torchrun.job_python(), "-m", MODULE, host.strip("[]"), str(port)],
                            cwd=helpers.import_root(), stdin=subprocess.DEVNULL,
                            preexec_fn=functools.partial(_die_with_parent, os.getpid()))
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    code = proc.wait()
    return code if code >= 0 else EXIT_SIGNAL_BASE - code  # killed: as a shell says it
