"""Where the group meets and who is which rank: small interfaces, so multi-node can slot in.

Today one daemon runs the whole group on one node: ranks are 0..N-1 and every attempt gets a
fresh free port on ``master_addr`` (a port from the previous attempt may still be held by a
dying process or sit in TIME_WAIT). A multi-node version replaces :class:`LocalRendezvous` with
one that agrees on the endpoint and the node's rank offset through a c10d store.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol


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


class Rendezvous(Protocol):
    def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        """The endpoint and this node's ranks for launch attempt ``attempt``."""
        ...


class LocalRendezvous:
    """Single node: ranks 0..N-1, a fresh free port for each attempt."""

    def __init__(self, addr: str) -> None:
        self.addr = addr

    def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        ranks = [RankInfo(r, r, local_world_size, local_world_size) for r in range(local_world_size)]
        return Endpoint(self.addr, free_port(self.addr)), ranks


def free_port(addr: str) -> int:
    """A port the kernel considers free on ``addr`` right now (the usual torchrun approach)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
