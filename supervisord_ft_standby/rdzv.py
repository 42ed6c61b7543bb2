"""``python -m supervisord_ft_standby.rdzv CONFIG_JSON``: one node's member of a multi-node job's c10d rendezvous.

Started once per run by the daemon (``supervisord_ft.noderdzv``, the daemon side of this
protocol). It runs torch's own rendezvous, ``DynamicRendezvousHandler`` over the c10d backend's
``TCPStore`` (the one torchrun's agent uses), and talks to the daemon in JSON lines
(:mod:`supervisord_ft_standby.lines`). Orders on stdin, each answered by one event on stdout:

- ``{"cmd": "join", "local_world_size": N}``: join the next round. Answer ``round`` (this node's
  group rank, the group's size, its first global rank, the workers' store), or ``timeout`` or
  ``closed`` with a reason. The group-rank-0 node's helper hosts a fresh ``TCPStore`` for the
  round's workers on ``local_addr`` only (gloo leaves ``default_pg/...`` keys behind, so no
  store is reused) and publishes where it listens.
- ``{"cmd": "vote", "step": S, "steps": [...]}``: this node's newest intact checkpoint step (or
  null) and the steps of the checkpoints it holds up to it; answer ``agreed`` with the step every
  node resumes from, the newest step every node holds (null if no node holds any), and
  ``differ: true`` when some node holds checkpoints but none is held by all (their checkpoint
  dirs are not one shared directory).
- ``{"cmd": "news", "kind": ..., ...}``: the job must restart or stop because of this node;
  the first news of a round wins (``compare_set``), and a restart counts once in the job's count.
  No answer: every helper, this one too, reports the round's news as a ``news`` event the moment
  it is set, because a thread per round blocks on the key with the store's ``wait``. A node that
  arrives while a round with room for it runs sets the news ``rejoin`` (see :meth:`Member._knocking`).
- ``{"cmd": "close", "outcome": ..., "reason": ...}``: the run ends here. Nodes of the current
  round wait for each other (bounded: ``close_timeout``) so that the store host stays up until all
  have read their news; a failed job closes the rendezvous so that joining nodes hear it at once.
  Answer ``exit``, then exit.

Every key of ours lives under ``supervisord_ft/<rdzv_id>/`` in the rendezvous store, the
round's under ``.../<round>/``.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from . import lines
from .store import Hosted

NEWS = "news"
RESTARTS = "restarts"
OUTCOME = "outcome"
# A connection to the rendezvous store that failed is replaced after this pause, until the join
# deadline: a store host that is restarting, or a network link that is down for a while.
RECONNECT_PAUSE = 1.0
# How long a probe of another node's store waits for its connect (see Member._reachable): a
# link that is down costs this plus the pause per try, and a dropped first SYN is resent at 1 s.
PROBE_TIMEOUT = 2.0
KNOCK_INTERVAL = 1.0  # torch's join looks at the rendezvous state as often


# The bell of the member whose join runs on this thread (one per process in the helper; the
# rendezvous load bench runs many members in one process, each joining on a thread of its own).
_joining = threading.local()


def _delay(seconds: float | tuple[float, float]) -> None:
    """Torch's join pause, in place of its module's ``_delay``: the joining member's bell, if any."""
    bell = getattr(_joining, "bell", None)
    if bell is not None:
        return bell.sleep(seconds)
    from torch.distributed.elastic.rendezvous.utils import _delay as torch_delay
    return torch_delay(seconds)


def _method_name(depth: int = 2) -> str:
    """What torch's ``get_method_name`` answers, the name of the function ``depth`` frames up,
    read from the frame itself: torch calls ``inspect.stack()`` twice for it, which reads the
    source lines of every frame on the stack, and it names an event so on every write of the
    rendezvous state (each try of a contended compare-and-set): most of a joining helper's CPU."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:  # a shallower stack, as torch's check
        return "no_method_name"


class Bell:
    """Wakes a joining helper when the rendezvous moves on, instead of a second later.

    While it waits for other nodes, torch's join reads the shared state, sleeps a second
    (``_delay(1)``) and reads it again, so a round completes up to a second after its last node
    joined. Here a helper that writes the state into another phase (another round, the round
    complete, the rendezvous closed) rings the bell (a counter and one key per ring in the store),
    and a helper's sleep ends at the next ring. Only those writes: a waiting node acts on nothing
    else before torch's second is up, and a ring on every write (each node's join, each heartbeat)
    woke every waiting node to read the whole state, N times per round and N / 5 times a second
    while a round ran (the rendezvous load bench, BENCHMARKS.md section 16). A ring missed (one
    between the read of the counter and the wait) costs the second torch would have slept anyway.
    Torch has no hook for either: its module's ``_delay`` (in this process only; it sleeps on the
    bell of the member joining on the calling thread), the handler's state holder's ``sync`` and
    its one-second read cache are replaced.
    """

    def __init__(self, ringer: Any, sleeper: Any) -> None:
        self.ringer, self.sleeper = ringer, sleeper  # one connection each: a wait blocks its own
        self._lock = threading.Lock()  # rings come from the join and from the heartbeat thread
        self._phase: tuple[int, bool, bool] | None = None  # of the state this node last synced

    def hang(self, handler: Any) -> None:
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous
        holder = handler._state_holder
        sync = holder.sync

        def synced() -> bool | None:
            written = sync()  # True: our changes to the state last synced are in the store
            state = holder.state
            phase, self._phase = self._phase, (state.round, state.complete, state.closed)
            if written and phase != self._phase:
                self.ring()
            return written

        holder.sync = synced
        dynamic_rendezvous._delay = _delay
        # The holder serves reads from a cache for a second: a wake-up would read the old state.
        holder._cache_duration = 0

    def ring(self) -> None:
        with self._lock:
            self.ringer.set(f"bell/{self.ringer.add('bell', 1)}", "")

    def sleep(self, seconds: float | tuple[float, float]) -> None:
        from torch.distributed import DistStoreError
        from torch.distributed.elastic.rendezvous.utils import _delay
        if isinstance(seconds, tuple):  # the random stagger before a first join: kept
            return _delay(seconds)
        try:
            rung = self.sleeper.add("bell", 0)
            self.sleeper.wait([f"bell/{rung + 1}"], timedelta(seconds=seconds))
        except DistStoreError:  # no ring within the second: torch's own pace
            pass


class Member:
    """This node's membership: the torch handler, our own store clients, the current round."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.conf: dict[str, str] = config["conf"]
        from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
        # torch's own parser: [::1]:PORT is ::1 (the daemon has already added a missing port)
        self.host, self.port = parse_rendezvous_endpoint(config["endpoint"], default_port=0)
        self.params = self._params(self.conf)
        self.join_timeout = float(self.conf.get("join_timeout", 600))
        self.close_timeout = float(self.conf.get("close_timeout", 30))
        self.read_timeout = timedelta(seconds=float(self.conf.get("read_timeout", 60)))
        self.handler: Any = None
        self.job: Any = None  # our keys, through a client of our own (the handler's is busy)
        self.round: int | None = None
        self.group_rank = 0
        self.nnodes = 0
        self.hosted: Hosted | None = None  # the round's workers' store, on group rank 0
        self.rdzv_host: Hosted | None = None  # the rendezvous store, where the endpoint is this node's
        self.bell: Bell | None = None
        self._lock = threading.Lock()

    def emit(self, **fields: Any) -> None:
        with self._lock:  # the news threads write too
            lines.write(1, **fields)

    def _connection(self) -> Any:
        """A new connection to the rendezvous store (the rendezvous load bench counts its calls)."""
        import torch.distributed as dist
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=self.read_timeout)

    def _client(self, prefix: str | None) -> Any:
        """A connection of our own to the rendezvous store; keys under ``prefix`` unless None."""
        import torch.distributed as dist
        store = self._connection()
        return store if prefix is None else dist.PrefixStore(prefix, store)

    def _params(self, conf: dict[str, str]) -> Any:
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        c = self.config
        return RendezvousParameters(backend="c10d", endpoint=c["endpoint"], run_id=c["run_id"],
                                    min_nodes=c["min_nodes"], max_nodes=c["max_nodes"],
                                    local_addr=c["local_addr"], **conf)

    def _reachable(self, deadline: float) -> None:
        """Raise :class:`OSError` at once if the endpoint of another node does not resolve or
        refuses a connection. Torch's store client would retry its connect for ``read_timeout``
        (60 s) whatever the join's deadline, and then say only that it timed out; a mistyped
        host then failed the run as a helper that did not answer."""
        if _is_local(self.host) and self.conf.get("is_host") != "0":
            return  # this node hosts the store, or joins the one that another process here hosts
        wait = min(max(deadline - time.monotonic(), 0.1), PROBE_TIMEOUT)
        try:
            socket.create_connection((self.host, self.port), timeout=wait).close()
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {self.host!r}: {exc.strerror}") from None
        except OSError as exc:
            raise OSError(f"cannot connect to {self.params.endpoint}: {exc.strerror or exc}") from None

    def _connect(self) -> None:
        """Join the rendezvous store; host it if its address is this node's and nobody does yet.

        Torch guesses whether to host from the host name only, so a node whose address is the
        endpoint's under another name (a pod's DNS name, a namespace's address) would never host
        and every node would wait for a store that nobody serves. An address is this node's if a
        socket can be bound to it; then hosting is tried first, as torch does, and a store that
        another process here already hosts is joined instead. An explicit ``is_host`` wins.

        The store hosted here listens on the endpoint's address only, on a socket bound here
        (:class:`~supervisord_ft_standby.store.Hosted`, as the workers' stores): torch's own listens on every
        interface, so anyone who reached any address of the node could write the rendezvous.
        """
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
        dynamic_rendezvous.get_method_name = _method_name
        guesses = ["1", "0"] if _is_local(self.host) else ["0"]
        for is_host in [self.conf["is_host"]] if "is_host" in self.conf else guesses:
            self.params = self._params({**self.conf, "is_host": is_host})
            if is_host == "0":  # the client that torch's registry would make, through _connection
                store = self._client(None)
                self.handler = create_handler(store, C10dRendezvousBackend(store, self.params.run_id), self.params)
                break
            if self.rdzv_host is None:  # after a reconnect: the store this helper hosts goes on
                try:
                    # libuv's server: torch's other one never wakes a wait on a key that a
                    # compare_set wrote (it did so only at the wait's timeout), as our news are
                    hosted = Hosted(self.host, self.port, timeout=self.read_timeout, libuv=True)
                except OSError:  # another process here hosts it: join that one (or, told to host, retry)
                    if "is_host" in self.conf:
                        raise
                    continue
                hosted.serve()
                self.rdzv_host = hosted  # lives as long as the helper: its store aborts if it is collected
            store = self.rdzv_host.store
            self.handler = create_handler(store, C10dRendezvousBackend(store, self.params.run_id), self.params)
            break
        prefix = f"supervisord_ft/{self.params.run_id}"
        self.job = self._client(prefix)
        self.bell = Bell(self._client(prefix), self._client(prefix))
        self.bell.hang(self.handler)

    # -- join ---------------------------------------------------------------------------------
    def join(self, local_world_size: int) -> None:
        from torch.distributed import DistError
        from torch.distributed.elastic.rendezvous import (RendezvousClosedError, RendezvousError,
                                                          RendezvousTimeoutError)
        deadline = time.monotonic() + self.join_timeout
        said = None  # the last retry's reason: a store that stays down is reported once
        while True:
            try:
                if self.handler is None:
                    self._reachable(deadline)
                    self._connect()
                _joining.bell = self.bell
                with self._knocking():
                    info = self.handler.next_rendezvous()
            except RendezvousClosedError:
                outcome = self._outcome()
                self.emit(event="closed", reason=outcome.get("reason", "the rendezvous was closed"),
                          signal=outcome.get("signal"), by_node=outcome.get("by_node"))
                return
            except RendezvousTimeoutError:
                self.emit(event="timeout", reason=f"no round completed within join_timeout "
                          f"{self.join_timeout:g} s (nnodes {self.params.min_nodes}:"
                          f"{self.params.max_nodes})")
                return
            except (RendezvousError, DistError, OSError) as exc:
                self.handler = None  # its connection may be out of step: a fresh one
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if time.monotonic() + RECONNECT_PAUSE > deadline:
                    self.emit(event="timeout", reason=f"rendezvous store {self.params.endpoint} "
                              f"unreachable for join_timeout {self.join_timeout:g} s: {reason}")
                    return
                if reason != said:
                    self.emit(event="retry", reason=reason)
                    said = reason
                time.sleep(RECONNECT_PAUSE)
                continue
            # The handler's round number: the same on every node of the round (torch keeps it in
            # its shared state; no public accessor).
            self.round = self.handler._state_holder.state.round
            self.group_rank, self.nnodes = info.rank, info.world_size
            try:
                return self._publish_round(local_world_size)
            except DistError as exc:  # a node of the round is gone before it said its size: rejoin
                self.emit(event="retry", reason=f"round {self.round}: {exc}".splitlines()[0])

    @contextmanager
    def _knocking(self) -> Iterator[None]:
        """While this node waits to join: whenever a round with room for it runs without it (it
        is new, back after its loss, or came after the round's last call), set that round's news
        ``rejoin``, so that its nodes start a bigger round at once. It looks at once and then every
        second, as torch's join does (torchrun's agents poll for waiting nodes instead), through
        a store client of its own: the handler is busy joining."""
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
        done = threading.Event()

        def knock() -> None:
            try:
                store = self._client(None)
                backend = C10dRendezvousBackend(store, self.params.run_id)
                while True:
                    found = backend.get_state()
                    state = pickle.loads(found[0]) if found else None
                    if state is not None and state.complete and len(state.participants) < self.params.max_nodes:
                        self.job.compare_set(f"{state.round}/{NEWS}", "", json.dumps(
                            {"kind": "rejoin", "reason": "a node is waiting to join", "by_node": None}))
                    if done.wait(KNOCK_INTERVAL):
                        return
            except Exception as exc:  # the join itself meets the same trouble and says so
                self.emit(event="retry", reason=f"knock: {type(exc).__name__}: {exc}".splitlines()[0])

        thread = threading.Thread(target=knock, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()

    def _publish_round(self, local_world_size: int) -> None:
        key = f"{self.round}/"
        self.job.set(f"{key}node/{self.group_rank}", json.dumps(local_world_size))
        if self.hosted is not None:
            self.hosted.close()
            self.hosted = None
        if self.group_rank == 0:
            self.hosted = Hosted(self.config["local_addr"], self.config["master_port"])
            self.job.set(f"{key}master", json.dumps([self.config["local_addr"], self.hosted.port]))
            self.hosted.serve()
        *sizes, master = self._gather([f"{key}node/{n}" for n in range(self.nnodes)] + [f"{key}master"])
        addr, port = master
        threading.Thread(target=self._watch, args=(self.round,), daemon=True).start()
        self.emit(event="round", round=self.round, group_rank=self.group_rank, nnodes=self.nnodes,
                  world_size=sum(sizes), rank_offset=sum(sizes[:self.group_rank]),
                  master_addr=addr, master_port=port, restarts=self.job.add(RESTARTS, 0))

    def _gather(self, keys: list[str]) -> list[Any]:
        """The values of ``keys`` once all are set (bounded: ``read_timeout``), in one request: a
        ``get`` per node cost each node N calls and the store N² per round."""
        return [json.loads(value) for value in self.job.multi_get(keys)]

    def _watch(self, round_: int) -> None:
        """Report the round's news the moment some node sets it; or that the store went away."""
        from torch.distributed import DistStoreError
        try:
            store = self._client(f"supervisord_ft/{self.params.run_id}/{round_}")
            while True:
                try:
                    store.wait([NEWS], self.read_timeout)
                    break
                except DistStoreError:  # a quiet round (or a link down): wait again
                    continue
            self.emit(event="news", round=round_, **json.loads(store.get(NEWS)))
        except Exception as exc:  # the store host is gone: the round cannot go on
            self.emit(event="lost", round=round_, reason=f"{type(exc).__name__}: {exc}".splitlines()[0])

    # -- after the round ----------------------------------------------------------------------
    def vote(self, step: int | None, steps: list[int]) -> None:
        from torch.distributed import DistError
        key = f"{self.round}/step/"
        try:
            self.job.set(f"{key}{self.group_rank}", json.dumps({"step": step, "steps": steps}))
            ballots = self._gather([f"{key}{n}" for n in range(self.nnodes)])
        except DistError as exc:  # a node of the round is gone before it voted
            self.emit(event="broken", round=self.round, reason=str(exc).splitlines()[0])
            return
        held = [set(b["steps"]) | ({b["step"]} if b["step"] is not None else set()) for b in ballots]
        common = set.intersection(*held)
        self.emit(event="agreed", round=self.round, step=max(common, default=None),
                  votes=[b["step"] for b in ballots], differ=not common and any(held))

    def news(self, fields: dict[str, Any]) -> None:
        if self.round is None:
            return
        value = json.dumps({**fields, "by_node": self.group_rank})
        try:
            won = self.job.compare_set(f"{self.round}/{NEWS}", "", value).decode() == value
            if won and fields["kind"] == "restart":
                self.job.add(RESTARTS, 1)
        except Exception as exc:  # a link down: the others find out by their own watchdogs
            self.emit(event="news_not_sent", round=self.round, reason=str(exc).splitlines()[0])

    def close(self, outcome: str, reason: str, signal: int | None) -> None:
        """Unless the job is DONE, close the rendezvous first, saying why: nodes that are joining
        hear it at once (as torchrun's agent shuts its rendezvous down)."""
        try:
            if outcome != "DONE" and self.handler is not None:
                self.job.set(OUTCOME, json.dumps({"outcome": outcome, "reason": reason,
                                                  "signal": signal, "by_node": self.group_rank}))
                self.handler.set_closed()
            if self.round is not None:
                key = f"{self.round}/exit/"
                self.job.set(f"{key}{self.group_rank}", outcome)
                self.job.wait([f"{key}{n}" for n in range(self.nnodes)],
                              timedelta(seconds=self.close_timeout))
        except Exception as exc:  # a node that is gone, a store that is gone: nothing to wait for
            self.emit(event="close_incomplete", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        self.emit(event="exit", outcome=outcome)

    def _outcome(self) -> dict[str, Any]:
        try:
            return json.loads(self.job.get(OUTCOME)) if self.job.check([OUTCOME]) else {}
        except Exception:  # only a better reason was at stake
            return {}


def _is_local(host: str) -> bool:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:  # not an address of this node (or a name that does not resolve)
        return False


def main() -> None:
    # Torch's handler would otherwise make group rank 0 host a store for the workers and publish
    # its address in the first round only: a node that joins a later round (one restarted after
    # its loss) waits for that address forever. The round's workers' store is ours (Hosted).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    member = Member(json.loads(sys.argv[1]))
    orders = lines.Reader(0)
    try:
        while (order := orders.read()) is not None:
            cmd = order.pop("cmd")
            if cmd == "join":
                member.join(order["local_world_size"])
            elif cmd == "vote":
                member.vote(order["step"], order.get("steps", []))
            elif cmd == "news":
                member.news(order)
            elif cmd == "close":
                member.close(order["outcome"], order["reason"], order.get("signal"))
                break
    except Exception:  # a bug: the daemon sees this helper exit 1 and fails the run, saying so
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # nothing of torch's teardown is needed; the hosted stores end with us


if __name__ == "__main__":
    main()
