"""The store host: every attempt's store is up before its ranks, fresh, on master_addr only."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from harness import Daemon, listening

PROBE = str(Path(__file__).with_name("store_probe.py"))
CRASHES = 5


async def test_every_attempt_meets_a_fresh_store_on_master_addr_and_a_dead_host_is_replaced(daemon, tmp_path):
    go = tmp_path / "go"
    os.mkfifo(go)
    fd = os.open(go, os.O_RDWR)
    os.environ.update(PROBE_GO=str(go), PROBE_CRASHES=str(CRASHES))
    try:
        d: Daemon = await daemon("--store-host", "--standby", "--restart-backoff", "0",
                                 "--max-restarts", str(CRASHES), "--grace-period", "5",
                                 "--max-stalled-attempts", "0",  # the same crash each time, on purpose
                                 command=[sys.executable, PROBE])
    finally:
        del os.environ["PROBE_GO"], os.environ["PROBE_CRASHES"]
    for rank in (0, 1):
        await d.wait_for(lambda e: e.get("worker_event") == "reduced" and e["rank"] == rank, timeout=120)
    host = d.named("store_host_started")[0]["pid"]
    port = d.named("launching")[0]["master_port"]
    assert listening(host) == {("127.0.0.1", port)}  # master_addr only, never 0.0.0.0
    for e in d.named("worker_output", worker_event="reduced"):
        assert listening(e["worker_pid"]) & {(ip, port) for ip in ("0.0.0.0", "127.0.0.1")} == set()
    os.kill(host, signal.SIGKILL)  # the next launch must start another host
    os.write(fd, b"gg")
    assert await d.finish(timeout=240) == 0
    launches = d.named("launching")
    assert len(launches) == CRASHES + 1 and all(e["agent_store"] for e in launches)
    assert len({e["master_port"] for e in launches}) == len(launches)  # a fresh store each time
    reduced = d.named("worker_output", worker_event="reduced")
    assert sorted((e["attempt"], e["rank"]) for e in reduced) == [(a, r) for a in range(CRASHES + 1) for r in (0, 1)]
    assert {(e["sum"], e["worker_agent_store"]) for e in reduced} == {(2.0, "True")}
    hosts = [e["pid"] for e in d.named("store_host_started")]
    assert len(hosts) == 2 and hosts[0] == host
    assert d.named("store_fallback") == []


async def test_a_store_host_that_dies_before_the_ranks_meet_is_replaced_within_seconds(daemon):
    """Killed right after it answered the launch's store, while the cold ranks still import torch:
    they would wait on a store that is gone until startup_timeout (1200 s); now its death is
    news, and the group is relaunched on a new store host, no restart spent."""
    job = [sys.executable, str(Path(__file__).with_name("jobs") / "ddp_plain.py"), "--steps", "20",
           "--step-time", "0.01", "--print", "none"]
    d: Daemon = await daemon("--store-host", "--restart-backoff", "0", "--max-restarts", "0", command=job)
    ready = await d.wait_for(lambda e: e["event"] == "store_ready", timeout=60)
    os.kill(ready["host_pid"], signal.SIGKILL)
    assert await d.finish(timeout=90) == 0
    reasons = [e["reason"] for e in d.named("state_changed", to="LAUNCHING")]
    assert reasons == ["a new store host for ranks that had not met yet (no restart spent)"]
    assert d.events[-1]["restarts"] == 0
    hosts = [e["host_pid"] for e in d.named("store_ready")]
    assert len(hosts) == 2 and hosts[0] != hosts[1]
