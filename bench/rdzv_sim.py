"""The processes of the rendezvous load bench (:mod:`bench.rdzv_load`).

- ``python -m bench.rdzv_sim store``: hosts one rendezvous store (the libuv ``TCPStore`` our
  helper hosts, :class:`~supervisord_ft_standby.store.Hosted`) on loopback, answers
  ``{"port": P}`` and serves until its stdin closes; alone in its process, so that its CPU and
  memory can be read from /proc.
- ``python -m bench.rdzv_sim nodes CONFIG_JSON``: N simulated nodes against that store, each a
  thread, no daemon, no workers. ``"impl": "ours"``: each node a
  :class:`~supervisord_ft_standby.rdzv.Member` (our helper's rendezvous: torch's handler with the
  bell, the news thread, the knock, the round's keys); ``"torch"``: each node torch's own
  ``DynamicRendezvousHandler`` driven as torchrun's agent drives it (``next_rendezvous``, then
  ``num_nodes_waiting`` every ``monitor_interval``; a node whose workers failed joins again);
  ``"torch-named"``: the same, its events named as our helper names them (``rdzv._method_name``),
  so that torch's own pace shows apart from its CPU, which N threads spend on this machine's cores.
  Prints one JSON line: the times, the store's CPU per phase (from /proc), the calls made to the
  store per phase (every connection is wrapped in :class:`Counting`).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from supervisord_ft import procfs
from supervisord_ft_standby import lines, rdzv
from supervisord_ft_standby.store import Hosted

RUN_ID = "bench"
VICTIM = 1  # the node whose workers fail: not the first, which hosts nothing special here


class Counting(dist.Store):
    """A store client that counts the calls made through it and the bytes they carry (values
    sent and received), for the whole process: one tally, read as deltas between phases."""

    calls: collections.Counter[str] = collections.Counter()
    _lock = threading.Lock()
    # A PrefixStore over one of these holds the C++ side only: without a reference the Python
    # object is collected and the PrefixStore's calls reach a pure virtual function.
    _alive: list[Counting] = []

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self.inner = inner
        with self._lock:
            self._alive.append(self)

    @classmethod
    def _count(cls, op: str, nbytes: int = 0) -> None:
        with cls._lock:
            cls.calls[op] += 1
            cls.calls["bytes"] += nbytes

    @classmethod
    def snapshot(cls) -> dict[str, int]:
        with cls._lock:
            return dict(cls.calls)

    def set(self, key: str, value: Any) -> None:
        self._count("set", len(value))
        self.inner.set(key, value)

    def get(self, key: str) -> bytes:
        value = self.inner.get(key)
        self._count("get", len(value))
        return value

    def multi_get(self, keys: list[str]) -> list[bytes]:
        values = self.inner.multi_get(keys)
        self._count("multi_get", sum(map(len, values)))
        return values

    def add(self, key: str, amount: int) -> int:
        self._count("add")
        return self.inner.add(key, amount)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        value = self.inner.compare_set(key, expected, desired)
        self._count("compare_set", len(expected) + len(desired) + len(value))
        return value

    def check(self, keys: list[str]) -> bool:
        self._count("check")
        return self.inner.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._count("wait")
        if timeout is None:
            self.inner.wait(keys)
        else:
            self.inner.wait(keys, timeout)

    def delete_key(self, key: str) -> bool:
        self._count("delete_key")
        return self.inner.delete_key(key)

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    @property
    def timeout(self) -> timedelta:
        return self.inner.timeout


def connect(port: int, timeout: timedelta) -> Counting:
    return Counting(dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout))


class SimError(Exception):
    pass


class Arrivals:
    """How many nodes have reached a point: the coordinator waits, bounded, for all of them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []

    def arrive(self, cycle: int) -> None:
        with self._cond:
            self._count[cycle] += 1
            self._cond.notify_all()

    def fail(self, node: int, exc: BaseException) -> None:
        with self._cond:
            self.errors.append(f"node {node}: {type(exc).__name__}: {exc}".splitlines()[0])
            self._cond.notify_all()

    def wait_all(self, cycle: int, nodes: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._count[cycle] >= nodes or self.errors, timeout):
                raise SimError(f"cycle {cycle}: {self._count[cycle]} of {nodes} nodes in after {timeout:g} s")
            if self.errors:
                raise SimError("; ".join(self.errors[:3]))


class SimNode(rdzv.Member):
    """Our helper's member, its events kept in a queue instead of written to the daemon."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()

    def _connection(self) -> Any:
        return connect(self.port, self.read_timeout)

    def emit(self, **fields: Any) -> None:
        self.events.put((time.monotonic(), fields))

    def expect(self, event: str, round_: int | None, timeout: float) -> float:
        """When this node emitted ``event`` (of ``round_``, if given); other events are passed over."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, fields = self.events.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise SimError(f"no {event} within {timeout:g} s") from None
            if fields["event"] == event and (round_ is None or fields.get("round") == round_):
                return at
            if fields["event"] in ("timeout", "closed", "lost", "broken"):
                raise SimError(f"{fields}")


def drive_ours(index: int, cfg: dict[str, Any], plan: Plan) -> None:
    node = SimNode(cfg["member"])
    for cycle in range(plan.cycles):
        node.join(1)
        plan.joined[cycle][index] = node.expect("round", None, plan.timeout)
        plan.arrivals.arrive(cycle)
        if cycle == plan.cycles - 1:
            return
        if index == VICTIM:  # its workers fail: it sets the news, tears down and joins at once
            if not plan.fail[cycle].wait(plan.timeout):
                raise SimError(f"cycle {cycle}: no failure ordered")
            node.news({"kind": "restart", "reason": "bench"})
            plan.heard[cycle][index] = time.monotonic()
        else:
            plan.heard[cycle][index] = node.expect("news", node.round, plan.timeout)


def drive_torch(index: int, cfg: dict[str, Any], plan: Plan) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    if cfg["impl"] == "torch-named":
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous
        dynamic_rendezvous.get_method_name = rdzv._method_name
    m = cfg["member"]
    store = connect(cfg["port"], timedelta(seconds=60))  # torch's read_timeout
    params = RendezvousParameters(backend="c10d", endpoint=m["endpoint"], run_id=RUN_ID, min_nodes=m["min_nodes"],
                                  max_nodes=m["max_nodes"], local_addr="127.0.0.1", is_host="0",
                                  join_timeout=m["conf"]["join_timeout"])
    handler = create_handler(store, C10dRendezvousBackend(store, RUN_ID), params)
    for cycle in range(plan.cycles):
        handler.next_rendezvous()
        plan.joined[cycle][index] = time.monotonic()
        plan.arrivals.arrive(cycle)
        if cycle == plan.cycles - 1:
            return
        if index == VICTIM:  # the agent's _restart_workers: straight into the next rendezvous
            if not plan.fail[cycle].wait(plan.timeout):
                raise SimError(f"cycle {cycle}: no failure ordered")
            plan.heard[cycle][index] = time.monotonic()
            continue
        # torchrun's agent: _monitor_workers, then num_nodes_waiting, every monitor_interval
        deadline = time.monotonic() + plan.timeout
        while handler.num_nodes_waiting() == 0:
            if time.monotonic() > deadline:
                raise SimError(f"cycle {cycle}: no node waiting within {plan.timeout:g} s")
            plan.stop.wait(plan.monitor_interval)
        plan.heard[cycle][index] = time.monotonic()


class Plan:
    """What the node threads share with the coordinator: when each joined and heard, per cycle."""

    def __init__(self, nodes: int, failures: int, timeout: float, monitor_interval: float) -> None:
        self.cycles = failures + 1
        self.timeout, self.monitor_interval = timeout, monitor_interval
        self.joined = [[0.0] * nodes for _ in range(self.cycles)]
        self.heard = [[0.0] * nodes for _ in range(failures)]
        self.fail = [threading.Event() for _ in range(failures)]
        self.stop = threading.Event()  # never set: the monitor's pace, bounded by its deadline
        self.arrivals = Arrivals()


def store_cpu(pid: int) -> float:
    stat = procfs.stat(pid)
    if stat is None:
        raise SimError("the store host is gone")
    return stat.cpu_ticks / procfs.CLK_TCK


def phase(pid: int) -> tuple[float, float, dict[str, int]]:
    return time.monotonic(), store_cpu(pid), Counting.snapshot()


def since(start: tuple[float, float, dict[str, int]], pid: int) -> dict[str, Any]:
    wall, cpu, calls = phase(pid)
    ops = {k: v - start[2].get(k, 0) for k, v in calls.items() if v - start[2].get(k, 0)}
    return {"wall_s": wall - start[0], "store_cpu_s": cpu - start[1], "bytes": ops.pop("bytes", 0),
            "ops": sum(ops.values()), "by_op": ops}


def simulate(cfg: dict[str, Any]) -> dict[str, Any]:
    nodes, pid = cfg["nodes"], cfg["store_pid"]
    plan = Plan(nodes, cfg["failures"], cfg["timeout"], cfg["monitor_interval"])
    drive = drive_ours if cfg["impl"] == "ours" else drive_torch

    def node(index: int) -> None:
        try:
            drive(index, cfg, plan)
        except BaseException as exc:  # the coordinator's wait ends with it, and says which node
            plan.arrivals.fail(index, exc)

    start = phase(pid)
    for index in range(nodes):
        threading.Thread(target=node, args=(index,), daemon=True).start()
    plan.arrivals.wait_all(0, nodes, cfg["timeout"])
    first = {**since(start, pid), "round_s": max(plan.joined[0]) - start[0]}
    quiet = phase(pid)
    time.sleep(cfg["quiet_s"])  # the measurement window of a round that runs: no synchronisation
    quiet = since(quiet, pid)
    failures = []
    for cycle in range(cfg["failures"]):
        start = phase(pid)
        plan.fail[cycle].set()
        plan.arrivals.wait_all(cycle + 1, nodes, cfg["timeout"])
        failures.append({**since(start, pid), "all_heard_s": max(plan.heard[cycle]) - start[0],
                         "next_round_s": max(plan.joined[cycle + 1]) - start[0]})
    me = procfs.status_field("self", "VmHWM")
    return {"first": first, "quiet": quiet, "failures": failures,
            "nodes_cpu_s": store_cpu(os.getpid()), "nodes_peak_rss_kib": int(me.split()[0]) if me else None}


def host_store() -> None:
    hosted = Hosted("127.0.0.1", 0, libuv=True)
    hosted.serve()
    lines.write(1, port=hosted.port)
    while os.read(0, 1 << 12):  # until the bench lets go
        pass
    os._exit(0)


def main() -> None:
    if sys.argv[1] == "store":
        host_store()
    cfg = json.loads(sys.argv[2])
    if cfg["impl"] == "ours":
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as our helper's main() does
    try:
        result = simulate(cfg)
    except SimError as exc:
        print(f"{cfg['impl']} at {cfg['nodes']} nodes: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    print(json.dumps(result), flush=True)
    os._exit(0)  # node threads still block in the store's waits


if __name__ == "__main__":
    main()
