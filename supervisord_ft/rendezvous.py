"""Where the group meets and who is which rank: small interfaces, so multi-node can slot in.

Today one daemon runs the whole group on one node: ranks are 0..N-1 and every attempt gets a
fresh free port on ``master_addr`` (a port from the previous attempt may still be held by a
dying process or sit in TIME_WAIT). A multi-node version replaces :class:`LocalRendezvous` with
one that agrees on the endpoint and the node's rank offset through a c10d store.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Protocol

from .errors import ConfigError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int = 0


@dataclass(frozen=True)
class Endpoint:
    addr: str
    port: int
    agent_store: bool = False  # a store is already up there: every rank is its client


class Rendezvous(Protocol):
    def check(self) -> None:
        """Raise :class:`ConfigError` if the group could never meet; called once at start-up."""
        ...

    async def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        """The endpoint and this node's ranks for launch attempt ``attempt``."""
        ...

    async def close(self) -> None:
        """Release what the rendezvous holds (a store host); called once when the run ends."""
        ...


class LocalRendezvous:
    """Single node: ranks 0..N-1; a fixed port, or a fresh free one for each attempt (port 0)."""

    def __init__(self, addr: str, port: int = 0) -> None:
        self.addr = addr
        self.port = port

    def check(self) -> None:
        """Before any worker starts: the address must be local and a fixed port free."""
        try:
            bind_port(self.addr, self.port)
        except OSError as exc:
            key = "master_port" if exc.errno == errno.EADDRINUSE else "master_addr"
            raise ConfigError(f"{key}: cannot listen on {self.addr}:{self.port}: {exc.strerror}") from None

    async def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        ranks = [RankInfo(r, r, local_world_size, local_world_size) for r in range(local_world_size)]
        return Endpoint(self.addr, self.port or bind_port(self.addr, 0)), ranks

    async def close(self) -> None:
        """Nothing is held: rank 0 hosts the store."""


def bind_port(addr: str, port: int) -> int:
    """Bind and release ``addr:port``; with port 0, a port the kernel considers free right now
    (the usual torchrun approach)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, port))
        return s.getsockname()[1]
