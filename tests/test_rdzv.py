"""The rendezvous helper alone (``python -m supervisord_ft_standby.rdzv``): several of them as the
nodes of one job on loopback, started as the daemon starts them, and what they ask of the store."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from datetime import timedelta
from typing import Any

from supervisord_ft import helpers
from supervisord_ft.noderdzv import NOTICES
from supervisord_ft_standby import rdzv

NODES = 4
TIMEOUT = 60  # seconds (torch parses join_timeout as an integer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ask(helper: asyncio.subprocess.Process, timeout: float, **order: Any) -> dict[str, Any]:
    """The helper's answer to ``order``, past the notices it sends unasked (as the daemon reads
    it): a node started before the store's host retries its connection, and says so once."""
    assert helper.stdin is not None and helper.stdout is not None
    helper.stdin.write(json.dumps(order).encode() + b"\n")
    await helper.stdin.drain()
    async with asyncio.timeout(timeout):
        while (answer := json.loads(await helper.stdout.readline()))["event"] in NOTICES:
            pass
        return answer


async def test_a_round_forming_rings_the_bell_once_not_once_per_joining_node():
    port = free_port()
    nodes = []
    try:
        for n in [*range(1, NODES), 0]:  # the host last: the others retry until its store is up
            config = {"endpoint": f"127.0.0.1:{port}", "run_id": "bell", "min_nodes": NODES, "max_nodes": NODES,
                      "conf": {"is_host": "1" if n == 0 else "0", "join_timeout": str(TIMEOUT)},
                      "local_addr": "127.0.0.1", "master_port": 0}
            nodes.append(await helpers.start(sys.executable, "supervisord_ft_standby.rdzv", json.dumps(config)))
        rounds = await asyncio.gather(*(ask(h, TIMEOUT, cmd="join", local_world_size=1) for h in nodes))
        assert {r["event"] for r in rounds} == {"round"}
        assert sorted(r["group_rank"] for r in rounds) == list(range(NODES))
        assert {r["world_size"] for r in rounds} == {NODES}

        import torch.distributed as dist
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT))
        # The one move to ring for: the round complete. Each node's join (a write of the state)
        # rang it too, and woke every waiting node to read the whole state.
        assert store.add("supervisord_ft/bell/bell", 0) == 1
    finally:
        for h in nodes:
            await helpers.stop(h)


def test_events_are_named_as_torch_names_them():
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import get_method_name

    def caller() -> list[str]:
        return named()

    def named() -> list[str]:
        return [get_method_name(), rdzv._method_name(), get_method_name(1), rdzv._method_name(1)]

    assert caller() == ["caller", "caller", "named", "named"]
