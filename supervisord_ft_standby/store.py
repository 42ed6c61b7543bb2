"""``python -m supervisord_ft_standby.store ADDR PORT``: the rendezvous store, up before any rank starts.

Started once per run by the daemon (``supervisord_ft.storehost``). For every launch attempt the
daemon writes ``{"attempt": N}`` on stdin; the helper closes the previous attempt's store, binds
and listens on ``ADDR`` itself (so the store listens there only, never on every interface),
answers ``{"attempt": N, "port": P}`` at once, and then serves a fresh ``TCPStore`` on that
socket (``master_listen_fd``). Ranks that connect before the store is serving wait in the
socket's backlog, so no rank ever races another to host it. A fresh store per attempt because
gloo leaves each rank's address under ``default_pg/...``: a reused store would hand the next
attempt the dead attempt's addresses. ``PORT`` 0 gives each store a fresh port; a fixed port is
reused, the previous store closed first.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

from . import lines

# How long a client's request may wait on this store (torch's default for TCPStore).
STORE_TIMEOUT = timedelta(minutes=5)


class Hosted:
    """One attempt's store and the listening socket it was given. The store closes that
    descriptor when it is destroyed, and aborts the process if someone closes it first: so the
    socket object lives as long as the store and is then only detached."""

    def __init__(self, addr: str, port: int, timeout: timedelta = STORE_TIMEOUT, libuv: bool = False) -> None:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(socket.SOMAXCONN)
        self.port = self.sock.getsockname()[1]
        self.timeout, self.libuv = timeout, libuv
        self.store = None

    def serve(self) -> None:
        import torch.distributed as dist
        self.store = dist.TCPStore(self.sock.getsockname()[0], self.port, is_master=True,
                                   wait_for_workers=False, timeout=self.timeout,
                                   master_listen_fd=self.sock.fileno(), use_libuv=self.libuv)

    def close(self) -> None:
        if self.store is None:
            self.sock.close()
            return
        self.store = None  # destroyed here: it closes the descriptor
        self.sock.detach()


def main() -> None:
    addr, port = sys.argv[1], int(sys.argv[2])
    requests = lines.Reader(0)
    hosted: Hosted | None = None
    while (request := requests.read()) is not None:
        if hosted is not None:
            hosted.close()
        hosted = Hosted(addr, port)
        lines.write(1, attempt=request["attempt"], port=hosted.port)
        hosted.serve()
    if hosted is not None:
        hosted.close()
    os._exit(0)  # the daemon let go: nothing of torch's teardown is needed


if __name__ == "__main__":
    main()
