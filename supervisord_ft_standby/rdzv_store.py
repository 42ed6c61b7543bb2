"""``python -m supervisord_ft_standby.rdzv_store ADDR PORT``: a job's rendezvous store, served apart
from its training nodes (what ``supervisord-ft rdzv-store`` runs; the daemon side is
:mod:`supervisord_ft.rdzvservice`).

The same store a node's rendezvous helper hosts when the endpoint is that node's address (torch's
``TCPStore`` on its libuv server, listening on ``ADDR`` only, see :class:`.store.Hosted`), in a
process whose life is no training node's: every node joins it as a client, so any node may die
and the others form the next round without it. One JSON line on stdout when it listens, one
when it stops (SIGTERM, SIGINT or SIGHUP: exit 0). The rendezvous state lives in its memory.
"""

from __future__ import annotations

import os
import signal
import sys

from . import lines
from .store import Hosted

STOP = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP)  # before the store's threads: they inherit it
    try:
        hosted = Hosted(addr, port, libuv=True)
        hosted.serve()
    except OSError as exc:  # the address is not this machine's, the port is taken
        lines.write(1, event="rdzv_store_failed", reason=f"{addr}:{port}: {exc.strerror or exc}")
        os._exit(1)
    host = f"[{addr}]" if ":" in addr else addr
    lines.write(1, event="rdzv_store_listening", endpoint=f"{host}:{hosted.port}", pid=os.getpid())
    stopped_by = signal.sigwait(STOP)
    lines.write(1, event="rdzv_store_stopped", signal=signal.Signals(stopped_by).name)
    os._exit(0)  # nothing of torch's teardown is needed


if __name__ == "__main__":
    main()
