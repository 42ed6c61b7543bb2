"""Multi-node: this node's daemon in a job of several, joined through torch's c10d rendezvous.

The daemon stays torch-free: a helper, ``python -m supervisord_ft_standby.rdzv`` (:mod:`supervisord_ft_standby.rdzv`, the torch
side of this protocol, which documents the orders and events), runs torch's
``DynamicRendezvousHandler`` over the rendezvous ``TCPStore`` as torchrun's agent does. Each launch
joins a round: this node's group rank, its ranks' offset, the round's fresh workers' store, then
the checkpoint every node resumes from (the lowest of the nodes' newest intact steps, so that
each node can load it from the shared checkpoint dir). While the round runs, another node's word
(:class:`News`: restart, stop, fail) arrives as the helper reads it from the store, in
milliseconds, and the loop awaits it beside its workers' exits.

A helper that dies ends the run FAILED (the round cannot be rejoined without it); every wait on
it is bounded by the rendezvous timeouts plus :data:`MARGIN`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import sys
from typing import Any

from . import checkpoints, helpers, tasks
from .checkpoints import Checkpoint, checkpoint_path
from .config import Config
from .errors import CheckpointDirsDiffer
from .rendezvous import Endpoint, LocalRendezvous, News, RankInfo, RendezvousFailed

MODULE = "supervisord_ft_standby.rdzv"
# Beyond the helper's own deadlines (join_timeout, read_timeout, close_timeout), which answer first.
MARGIN = 30.0
# Events the helper sends unasked; each is logged as a warning and nothing waits for it.
NOTICES = {"retry": "rendezvous_retry", "news_not_sent": "news_not_sent",
           "close_incomplete": "rendezvous_close_incomplete"}


def node_addr(cfg: Config) -> str:
    """This node's address as the others reach it: ``local_addr``, else (as torchrun) its fully
    qualified host name."""
    return cfg.local_addr or socket.getfqdn()


class NodeRendezvous:
    """The Rendezvous of one node of a multi-node job; see the module docstring."""

    multi_node = True

    def __init__(self, cfg: Config, log: Any, where: dict[str, Any], python: str = sys.executable) -> None:
        """``where``: the fields every event of this daemon gets (:class:`logs.Log`'s context):
        its node rank and round, set here for each round (null before the first)."""
        self.cfg = cfg
        self.python = python
        self.local_addr = node_addr(cfg)
        self.conf = cfg.rdzv_options
        self.min_nodes, self.max_nodes = cfg.node_range
        self.helper: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.heard: asyncio.Queue[News] = asyncio.Queue()
        self.round: int | None = None
        self.node_rank: int | None = None
        self.restarts = 0
        self.log = log
        self.where = where
        where.update(node_rank=None, round=None)

    def check(self) -> None:
        """This node's address must be local: the round's workers' store may be hosted on it."""
        LocalRendezvous(self.local_addr, self.cfg.master_port).check()

    def _timeout(self, key: str, default: float) -> float:
        return float(self.conf.get(key, default)) + MARGIN

    # -- the helper ---------------------------------------------------------------------------
    async def _ensure_helper(self) -> asyncio.subprocess.Process:
        if self.helper is not None and self.helper.returncode is None:
            return self.helper
        await self._stop_helper()
        config = {"endpoint": self.cfg.rdzv_endpoint, "run_id": self.cfg.rdzv_id,
                  "min_nodes": self.min_nodes, "max_nodes": self.max_nodes, "conf": self.conf,
                  "local_addr": self.local_addr, "master_port": self.cfg.master_port}
        try:
            self.helper = await helpers.start(self.python, MODULE, json.dumps(config))
        except OSError as exc:
            raise RendezvousFailed(f"cannot start the rendezvous helper: {exc}") from None
        self.replies = asyncio.Queue()
        self.reader = tasks.start("rdzv-helper", functools.partial(self._read, self.helper), self.log)
        self.log.info("rendezvous_helper_started", pid=self.helper.pid, endpoint=self.cfg.rdzv_endpoint,
                      rdzv_id=self.cfg.rdzv_id, nnodes=f"{self.min_nodes}:{self.max_nodes}",
                      local_addr=self.local_addr)
        return self.helper

    async def _read(self, helper: asyncio.subprocess.Process) -> None:
        assert helper.stdout is not None
        while line := await helper.stdout.readline():
            event = json.loads(line)
            kind = event.pop("event")
            if kind in ("news", "lost"):
                self.heard.put_nowait(News(kind=event.get("kind", kind), round=event["round"],
                                           by_node=event.get("by_node"), reason=event["reason"],
                                           rank=event.get("rank"), returncode=event.get("returncode"),
                                           signal=event.get("signal")))
            elif kind in NOTICES:
                self.log.warning(NOTICES[kind], **event)
            else:
                self.replies.put_nowait({"event": kind, **event})
        self.replies.put_nowait({"event": "helper_exited", "returncode": await helper.wait()})

    async def _ask(self, order: dict[str, Any], timeout: float) -> dict[str, Any]:
        helper = await self._ensure_helper()
        assert helper.stdin is not None
        try:
            async with asyncio.timeout(timeout):
                helper.stdin.write(json.dumps(order).encode() + b"\n")
                await helper.stdin.drain()
                reply = await self.replies.get()
        except TimeoutError:
            await self._stop_helper()
            raise RendezvousFailed(f"the rendezvous helper did not answer {order['cmd']!r} "
                                   f"within {timeout:g} s") from None
        except OSError as exc:
            reply = {"event": "helper_exited", "returncode": None, "error": str(exc)}
        if reply["event"] == "helper_exited":
            await self._stop_helper()
            raise RendezvousFailed(f"the rendezvous helper exited with {reply['returncode']} "
                                   "(its stderr is the daemon's)")
        return reply

    async def _stop_helper(self) -> None:
        helper, self.helper = self.helper, None
        await helpers.stop(helper)
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None

    # -- the Rendezvous protocol --------------------------------------------------------------
    async def next_round(self, attempt: int, local_world_size: int) -> tuple[Endpoint, list[RankInfo]]:
        self.round = None
        self.log.info("rendezvous_joining", attempt=attempt, local_world_size=local_world_size)
        try:
            reply = await self._ask({"cmd": "join", "local_world_size": local_world_size},
                                    self._timeout("join_timeout", 600))
        except asyncio.CancelledError:  # a stop while joining: the helper is stuck in torch
            await self._stop_helper()
            raise
        if reply["event"] == "closed":
            by = f"node {reply['by_node']}: " if reply.get("by_node") is not None else ""
            raise RendezvousFailed(f"closed by {by}{reply['reason']}", reply.get("signal"))
        if reply["event"] != "round":
            raise RendezvousFailed(f"{reply['event']}: {reply.get('reason')}")
        self.round, self.node_rank = reply["round"], reply["group_rank"]
        self.where.update(node_rank=self.node_rank, round=self.round)
        self.log.info("rendezvous_round", attempt=attempt, nnodes=reply["nnodes"],
                      world_size=reply["world_size"], rank_offset=reply["rank_offset"],
                      master_addr=reply["master_addr"], master_port=reply["master_port"],
                      restarts=reply["restarts"])
        self.restarts = reply["restarts"]
        offset, world = reply["rank_offset"], reply["world_size"]
        ranks = [RankInfo(offset + r, r, world, local_world_size, self.node_rank, reply["nnodes"])
                 for r in range(local_world_size)]
        return Endpoint(reply["master_addr"], reply["master_port"], agent_store=True), ranks

    async def agree(self, newest: Checkpoint | None) -> Checkpoint | None:
        held = [s for s in checkpoints.steps(self.cfg.checkpoint_dir) if newest and s <= newest.step]
        reply = await self._ask({"cmd": "vote", "step": newest.step if newest else None, "steps": held},
                                self._timeout("read_timeout", 60))
        if reply["event"] != "agreed":
            raise RendezvousFailed(f"round {self.round} broken before every node voted: {reply['reason']}")
        step = reply["step"]
        if reply.get("differ"):  # resuming from any one of them would lose, or fail on, the others
            raise CheckpointDirsDiffer(
                f"{self.cfg.checkpoint_dir} holds no checkpoint step that every node holds (newest "
                f"by node: {reply['votes']}): the nodes' checkpoint dirs are not one shared directory")
        self.log.info("checkpoint_agreed", step=step, votes=reply["votes"])
        if step is None:
            return None
        return newest if newest is not None and newest.step == step else \
            Checkpoint(step, checkpoint_path(self.cfg.checkpoint_dir, step))

    async def news(self) -> News:
        while True:
            news = await self.heard.get()
            if news.round == self.round and news.by_node != self.node_rank:
                return news

    def announce(self, kind: str, reason: str, **fields: int | None) -> None:
        helper = self.helper
        if helper is None or helper.returncode is not None or helper.stdin is None:
            return  # no helper: no round to tell
        helper.stdin.write(json.dumps({"cmd": "news", "kind": kind, "reason": reason,
                                       **fields}).encode() + b"\n")

    async def close(self, outcome: str, reason: str, signal: int | None = None) -> None:
        if self.helper is not None and self.helper.returncode is None:
            try:
                await self._ask({"cmd": "close", "outcome": outcome, "reason": reason,
                                 "signal": signal},
                                self._timeout("close_timeout", 30))
            except RendezvousFailed as exc:
                self.log.warning("rendezvous_close_failed", reason=str(exc))
        await self._stop_helper()
