"""A rendezvous whose store is up before any rank starts, hosted by a torch helper process.

When rank 0 hosts the store in its ``init_process_group``, a rank that gets there first finds
nothing listening and its client backs off (0.3-0.7 s of a recovery, BENCHMARKS.md, finding 4);
and rank 0's store listens on every interface whatever ``MASTER_ADDR`` says. Here the daemon
starts ``python -m supervisord_ft_standby.store`` (:mod:`supervisord_ft_standby.store`, the torch side of this protocol) once
per run and asks it for a fresh store for every attempt before the ranks are spawned; the ranks
are its clients (``TORCHELASTIC_USE_AGENT_STORE=True``, as under torchrun's agent).

The helper is supervised, not trusted: if it has died, or does not answer within
:data:`REPLY_TIMEOUT`, a new one is started for that round; if that one fails too, the round
falls back to rank 0 hosting (:class:`LocalRendezvous`), so a launch never hangs on it. Its
death while a round runs is news (:meth:`StoreRendezvous.news`, kind ``store``): ranks that
have not met yet wait on a store that is gone, so the loop relaunches them on a new one.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from . import helpers
from .rendezvous import Endpoint, LocalRendezvous, News, RankInfo, SingleNode
from .workers import KILL_TIMEOUT

# The first answer comes before the helper imports torch: it only binds a socket.
REPLY_TIMEOUT = 10.0


class StoreHostError(Exception):
    """The helper died or did not answer."""


class StoreRendezvous(SingleNode):
    """Single node, like :class:`LocalRendezvous`, with each attempt's store hosted by the helper."""

    def __init__(self, addr: str, port: int, log: Any, python: str = sys.executable) -> None:
        self.local = LocalRendezvous(addr, port)
        self.python = python
        self.log = log
        self.helper: asyncio.subprocess.Process | None = None
        self._told: asyncio.subprocess.Process | None = None  # the helper whose death was news

    def check(self) -> None:
        self.local.check()

    async def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        endpoint, ranks = await self.local.next_round(attempt, local_world_size)
        for _ in range(2):  # a helper found dead or mute is replaced once per round
            try:
                port = await self._ask(attempt)
            except StoreHostError as exc:
                self.log.warning("store_host_failed", attempt=attempt, reason=str(exc))
                await self._stop()
                continue
            self.log.info("store_ready", attempt=attempt, addr=endpoint.addr, port=port,
                          host_pid=self.helper.pid if self.helper else None)
            return Endpoint(endpoint.addr, port, agent_store=True), ranks
        self.log.warning("store_fallback", attempt=attempt, reason="rank 0 hosts the store this round")
        return endpoint, ranks

    async def news(self) -> News:
        """The death of the helper hosting this round's store, once per helper."""
        helper = self.helper
        if helper is None or helper is self._told:
            return await super().news()
        rc = await helper.wait()
        if helper is not self.helper:  # replaced or stopped by this rendezvous itself
            return await super().news()
        self._told = helper
        return News("store", 0, None, f"the store host (pid {helper.pid}) exited with {rc}")

    async def close(self, outcome: str = "", reason: str = "", signal: int | None = None) -> None:
        await self._stop()

    async def _ask(self, attempt: int) -> int:
        if self.helper is None or self.helper.returncode is not None:
            await self._stop()  # a dead one: reaped, its pid no longer counted ours
            await self._start()
        helper = self.helper
        assert helper is not None and helper.stdin is not None and helper.stdout is not None
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                helper.stdin.write(json.dumps({"attempt": attempt}).encode() + b"\n")
                await helper.stdin.drain()
                line = await helper.stdout.readline()
        except TimeoutError:
            raise StoreHostError(f"no answer within {REPLY_TIMEOUT:g} s") from None
        except OSError as exc:
            raise StoreHostError(f"request not delivered: {exc}") from None
        if not line:
            rc = await asyncio.wait_for(helper.wait(), KILL_TIMEOUT)
            raise StoreHostError(f"the store host exited with {rc}")
        answer = json.loads(line)
        if answer.get("attempt") != attempt:
            raise StoreHostError(f"answered {answer} for attempt {attempt}")
        return int(answer["port"])

    async def _start(self) -> None:
        try:
            self.helper = await helpers.start(self.python, "supervisord_ft_standby.store", self.local.addr,
                                              str(self.local.port))
        except OSError as exc:
            raise StoreHostError(f"cannot start the store host: {exc}") from None
        self.log.info("store_host_started", pid=self.helper.pid)

    async def _stop(self) -> None:
        helper, self.helper = self.helper, None
        await helpers.stop(helper)
