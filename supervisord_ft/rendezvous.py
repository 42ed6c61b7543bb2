"""Where the group meets and who is which rank: small interfaces, so multi-node can slot in.

On one node a daemon runs the whole group: ranks are 0..N-1 and every attempt gets a fresh free
port on ``master_addr`` (a port from the previous attempt may still be held by a dying process
or sit in TIME_WAIT). Several nodes meet through torch's c10d rendezvous instead
(:mod:`supervisord_ft.noderdzv`): it agrees on the endpoint, each node's rank offset and the
checkpoint to resume from, and carries each node's word on the job (:class:`News`) to the others.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from typing import Protocol

from .checkpoints import Checkpoint
from .errors import ConfigError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int = 0
    nnodes: int = 1


@dataclass(frozen=True)
class Endpoint:
    addr: str
    port: int
    agent_store: bool = False  # a store is already up there: every rank is its client


class RendezvousFailed(Exception):
    """The group cannot meet (a node that never came, a closed rendezvous): the run fails, or
    stops with ``stop_signal`` when a node closed it because it was told to stop."""

    def __init__(self, reason: str, stop_signal: int | None = None) -> None:
        super().__init__(reason)
        self.stop_signal = stop_signal


@dataclass(frozen=True)
class News:
    """One node's word on the job, for every other node of the round: ``restart`` (a rank of
    that node failed or hung), ``stop`` (it got a stop signal), ``rejoin`` (a node waits to join a
    round with room for it: a new round, no restart spent; ``by_node`` None), or ``lost`` (the
    rendezvous store went away; from this node's own helper); single node, ``store`` (the helper
    hosting the round's store died)."""

    kind: str
    round: int
    by_node: int | None
    reason: str
    rank: int | None = None  # the failed rank (global)
    returncode: int | None = None
    signal: int | None = None


class Rendezvous(Protocol):
    multi_node: bool  # ranks on other nodes: checkpoints are agreed, news flows both ways
    restarts: int  # the job's relaunches as of the last round, counted alike on every node
    round: int | None  # the last round's number, the same on every node (None: single node)

    def check(self) -> None:
        """Raise :class:`ConfigError` if the group could never meet; called once at start-up."""
        ...

    async def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        """The endpoint and this node's ranks for launch attempt ``attempt``; raises
        :class:`RendezvousFailed` when the group cannot meet."""
        ...

    async def agree(self, newest: Checkpoint | None) -> Checkpoint | None:
        """The checkpoint every node of the round resumes from, given this node's newest intact one."""
        ...

    async def news(self) -> News:
        """The next word from another node of the current round (never, on a single node)."""
        ...

    def announce(self, kind: str, reason: str, **fields: int | None) -> None:
        """Tell every other node of the round (``kind`` as in :class:`News`); never blocks."""
        ...

    async def close(self, outcome: str, reason: str, signal: int | None = None) -> None:
        """Release what the rendezvous holds (a store host); called once when the run ends, with
        the final state, its reason and the stop signal if any (the other nodes end alike)."""
        ...


class SingleNode:
    """What every single-node rendezvous shares: nobody to agree with or to hear from."""

    multi_node = False
    restarts = 0  # the daemon's own count is the job's
    round = None

    async def agree(self, newest: Checkpoint | None) -> Checkpoint | None:
        return newest

    async def news(self) -> News:
        await asyncio.Future()  # nobody else: the caller cancels this wait
        raise AssertionError("unreachable")

    def announce(self, kind: str, reason: str, **fields: int | None) -> None:
        """Nobody to tell."""


class LocalRendezvous(SingleNode):
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

    async def close(self, outcome: str = "", reason: str = "", signal: int | None = None) -> None:
        """Nothing is held: rank 0 hosts the store."""


def bind_port(addr: str, port: int) -> int:
    """Bind and release ``addr:port``; with port 0, a port the kernel considers free right now
    (the usual torchrun approach). With SO_REUSEADDR, as every TCPStore binds: a port that only
    the last run's closed connections hold (TIME_WAIT) is free to a store, so it is here too."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        return s.getsockname()[1]
