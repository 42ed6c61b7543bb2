"""Multi-node on one machine: several daemons, one run dir each, one shared checkpoint dir,
the real torch worker over gloo (the fake one where the world size changes), joined through
torch's c10d rendezvous; on loopback (IPv4, and IPv6 once), and in network namespaces joined by
a bridge, where a node's link can be cut (root needed, as CI has: without it those tests fail).

Run by ``make test-multinode`` (marker ``multinode``; CI runs it), not by ``make test``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import datetime

import pytest

import netns
from harness import Cluster, Daemon, listening, pid_alive

pytestmark = pytest.mark.multinode

# 20 global steps, a checkpoint every 5; a reference run has the same sizes and seed.
SIZES = ["--epochs", "1", "--steps", "20", "--checkpoint-interval", "5"]
COMMON = [*SIZES, "--grace-period", "5", "--restart-backoff", "0", "--hang-timeout", "30"]
# Rounds complete within a second; a node whose daemon died is dropped from the rendezvous after
# 2 s without heartbeats (torch's default is 15 s).
FAST = "keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=1"


def final_sha(*nodes: Daemon) -> str:
    shas = {e["weights_sha256"] for d in nodes for e in d.named("worker_output", worker_event="training_done")}
    assert len(shas) == 1, shas  # every rank of every node reports the same weights
    return shas.pop()


_REFERENCES: dict[tuple[str, ...], str] = {}


async def reference_sha(tmp_path, world_size: int, *sizes: str) -> str:
    """The weights of an uninterrupted single-node run of the same world size and sizes (once
    per module)."""
    args = (*SIZES, *sizes, "--num-workers", str(world_size))
    if args not in _REFERENCES:
        workdir = tmp_path / "reference"
        workdir.mkdir()
        d = await Daemon.start(workdir, *args)
        try:
            assert await d.finish(timeout=180) == 0
            _REFERENCES[args] = final_sha(d)
        finally:
            await d.kill()
    return _REFERENCES[args]


def recovering_reasons(d: Daemon) -> list[str]:
    return [e["reason"] for e in d.named("state_changed", to="RECOVERING")]


@pytest.mark.parametrize("nnodes", [2, 3])
async def test_a_job_of_several_nodes_ends_done_with_the_weights_of_one_node(cluster, tmp_path, nnodes):
    c: Cluster = await cluster(nnodes, *COMMON)
    assert await c.finish() == [0] * nnodes
    sha = final_sha(*c.nodes)
    assert sha == await reference_sha(tmp_path, nnodes)
    rounds = [d.named("rendezvous_round")[0] for d in c.nodes]
    assert sorted(r["node_rank"] for r in rounds) == list(range(nnodes))
    assert {(r["round"], r["world_size"], r["master_port"]) for r in rounds} == {(0, nnodes, rounds[0]["master_port"])}
    for d in c.nodes:  # every event says which node and which round it comes from
        assert all("node_rank" in e and "round" in e for e in d.events)
        env = d.named("launching")[0]
        assert env["agent_store"] is True


async def test_the_rendezvous_and_workers_stores_listen_on_the_nodes_address_only(cluster):
    from harness import FAKE_WORKER
    c = await cluster(2, "--grace-period", "2", command=[*FAKE_WORKER, "--steps", "400", "--step-time", "0.02"])
    for d in c.nodes:
        await d.wait_for(lambda e: e.get("worker_event") == "step")
    helpers = [d.named("rendezvous_helper_started")[0]["pid"] for d in c.nodes]
    rdzv_port = int(c.endpoint.rpartition(":")[2])
    workers_port = c.nodes[0].named("rendezvous_round")[0]["master_port"]
    # torch's own rendezvous store would listen on *:PORT. Node 0 hosts it (is_host); the
    # workers' store is the group-rank-0 node's, which either node may be.
    assert ("127.0.0.1", rdzv_port) in listening(helpers[0])
    assert listening(helpers[0]) | listening(helpers[1]) == {("127.0.0.1", rdzv_port), ("127.0.0.1", workers_port)}
    assert await c.finish(timeout=60) == [0, 0]


async def test_an_ipv6_endpoint_in_brackets_joins_the_nodes(cluster):
    from harness import FAKE_WORKER
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))  # an OSError here: this machine has no IPv6 loopback to test on
    c = await cluster(2, "--grace-period", "2", loopback="::1",
                      command=[*FAKE_WORKER, "--steps", "20", "--step-time", "0.02"])
    assert c.endpoint.startswith("[::1]:")  # torchrun's spelling; the helper once kept the brackets
    assert await c.finish(timeout=60) == [0, 0]
    assert {d.named("rendezvous_round")[0]["master_addr"] for d in c.nodes} == {"::1"}


async def test_a_rank_crash_on_one_node_is_recovered_by_every_node(cluster, tmp_path):
    c = await cluster(2, *COMMON, "--crash-at-step", "7", "--crash-rank", "1")
    assert await c.finish() == [0, 0]
    assert final_sha(*c.nodes) == await reference_sha(tmp_path, 2)
    crashed = next(d for d in c.nodes if d.named("rendezvous_round")[0]["rank_offset"] == 1)
    other = next(d for d in c.nodes if d is not crashed)
    assert recovering_reasons(crashed) == ["rank 1 exited with 1"]
    # The other node learns it through the store, not from its own ranks or a timeout.
    heard = other.named("state_changed", to="RECOVERING")[0]
    assert heard["reason"].startswith("node 1:") or heard["reason"].startswith("rank 0 exited")
    for d in c.nodes:  # one restart, counted alike; both resume from the same checkpoint
        assert d.events[-1]["restarts"] == 1
        agreed = d.named("checkpoint_agreed")
        assert [a["step"] for a in agreed][0] is None and agreed[-1]["step"] == 7


async def test_a_hang_on_one_node_restarts_the_job_on_every_node(cluster, tmp_path):
    # Node 1 declares a hang after 3 s of silence; node 0 would wait 30 s, so it hears of it.
    c = await cluster(2, *COMMON, per_node=[[], ["--hang-timeout", "3"]])
    hung = c.nodes[1]
    await hung.wait_for(lambda e: e.get("worker_event") == "step" and e["worker_step"] >= 3)
    os.kill(hung.worker_pids()[0], signal.SIGSTOP)  # silent, alive, holding its peer in a collective
    assert await c.finish() == [0, 0]
    assert final_sha(*c.nodes) == await reference_sha(tmp_path, 2)
    assert recovering_reasons(hung)[0].startswith("rank ") and "hung" in recovering_reasons(hung)[0]
    assert recovering_reasons(c.nodes[0])[0].startswith("node ")


async def test_a_node_whose_daemon_is_sigkilled_and_restarted_rejoins_and_the_job_ends_done(cluster, tmp_path):
    c = await cluster(2, *COMMON, rdzv_conf=FAST)
    lost = c.nodes[1]
    await lost.wait_for(lambda e: e.get("worker_event") == "step" and e["worker_step"] >= 5)
    assert await lost.sigkill() == []  # its workers died with it
    survivor = c.nodes[0]
    await survivor.wait_for(lambda e: e["event"] == "rendezvous_joining" and e["attempt"] == 1)
    back = await c.restart(1)
    assert await c.finish() == [0, 0]
    assert final_sha(survivor, back) == await reference_sha(tmp_path, 2)
    rejoined = back.named("rendezvous_round")[0]
    assert rejoined["round"] == survivor.named("rendezvous_round")[-1]["round"] >= 1
    assert rejoined["restarts"] == 1 and back.events[-1]["restarts"] == 1  # the job's count


async def test_sigterm_on_one_node_stops_every_node_gracefully(cluster):
    c = await cluster(2, *COMMON, "--steps", "400")
    for d in c.nodes:
        await d.wait_for(lambda e: e.get("worker_event") == "step")
    c.nodes[1].signal(signal.SIGTERM)
    assert await c.finish() == [143, 143]
    assert c.nodes[0].named("state_changed", to="STOPPING")[0]["reason"].startswith("node ")
    stopped = [e for d in c.nodes for e in d.named("worker_output", worker_event="stopped")]
    assert len(stopped) == 2 and len({e["worker_step"] for e in stopped}) == 1  # the same step


async def test_a_node_that_joins_late_within_the_timeout_is_waited_for(cluster, tmp_path):
    c = await cluster(2, *COMMON, start=[0])
    await c.nodes[0].wait_for(lambda e: e["event"] == "rendezvous_joining")
    await asyncio.sleep(3)  # the scenario itself: a node that is late, not a synchronisation
    await c.start_node(1)
    assert await c.finish() == [0, 0]
    assert final_sha(*c.nodes) == await reference_sha(tmp_path, 2)


async def test_a_node_that_never_comes_fails_the_run_with_a_reason(cluster):
    c = await cluster(2, *COMMON, rdzv_conf="join_timeout=4", start=[0])
    assert await c.finish(timeout=90) == [1]
    exit_ = c.nodes[0].events[-1]
    assert exit_["state"] == "FAILED"
    reason = c.nodes[0].named("state_changed", to="FAILED")[0]["reason"]
    assert "join_timeout 4 s" in reason and "nnodes 2:2" in reason


async def test_an_endpoint_that_does_not_resolve_fails_the_run_within_join_timeout_naming_it(daemon):
    # .invalid never resolves (RFC 2606). Torch's store client alone retried for read_timeout
    # (60 s) and the daemon gave up on a mute helper after join_timeout + 30 s.
    d = await daemon("--nnodes", "2", "--rdzv-endpoint", "nohost.invalid:29400",
                     "--rdzv-conf", "join_timeout=3", command=["true"])
    assert await d.finish(timeout=20) == 1
    reason = d.named("state_changed", to="FAILED")[0]["reason"]
    assert "unreachable for join_timeout 3 s" in reason and "cannot resolve 'nohost.invalid'" in reason
    assert len(d.named("rendezvous_retry")) == 1  # said once, however often it is tried


async def test_a_store_that_refuses_is_waited_for_until_join_timeout_and_named(cluster):
    netns.require()
    with netns.bridged(2) as net:  # node 0, whose address the endpoint is, never starts
        c = await cluster(2, *COMMON, net=net, rdzv_conf="join_timeout=4", start=[1])
        assert await c.finish(timeout=30, nodes=[1]) == [1]
    reason = c.nodes[1].named("state_changed", to="FAILED")[0]["reason"]
    assert f"cannot connect to {c.endpoint}" in reason and "refused" in reason, reason


LOSE = ["--restart-backoff", "0", "--grace-period", "2"]
# Both nodes are in the first round: after MIN nodes, the round waits last_call_timeout for more.
LOSE_CONF = FAST.replace("last_call_timeout=1", "last_call_timeout=5")


async def lose_a_node(c: Cluster, lost: int) -> tuple[Daemon, int]:
    """Both nodes step in one round; node ``lost``'s daemon is SIGKILLed (its rank dies with it)
    and the other's rank too, as a rank that lost its peer would (the fake worker has no
    collective): the survivor and its killed rank's pid."""
    survivor = c.nodes[1 - lost]
    for d in c.nodes:
        first = await d.wait_for(lambda e: e["event"] == "rendezvous_round")
        assert first["world_size"] == 2
        await d.wait_for(lambda e: e.get("worker_event") == "step")
    await c.nodes[lost].sigkill()
    survivor_pid = survivor.worker_pids()[0]
    os.kill(survivor_pid, signal.SIGKILL)
    return survivor, survivor_pid


async def goes_on_alone(survivor: Daemon, survivor_pid: int) -> None:
    alone = await survivor.wait_for(lambda e: e["event"] == "rendezvous_round" and e["round"] >= 1, timeout=60)
    assert alone["nnodes"] == 1 and alone["world_size"] == 1
    env = await survivor.wait_for(lambda e: e.get("worker_event") == "env" and e["restart"] == 1)
    assert env["env"]["WORLD_SIZE"] == "1" and env["env"]["GROUP_WORLD_SIZE"] == "1"
    survivor.signal(signal.SIGTERM)
    assert await survivor.finish() == 143
    assert not pid_alive(survivor_pid)


async def test_with_min_max_nodes_the_job_goes_on_without_a_lost_node(cluster):
    from harness import FAKE_WORKER
    c = await cluster(2, *LOSE, nnodes_spec="1:2", rdzv_conf=LOSE_CONF,
                      command=[*FAKE_WORKER, "--print-env", "--steps", "400", "--step-time", "0.05"])
    await goes_on_alone(*await lose_a_node(c, lost=1))


async def test_the_node_that_hosts_the_store_lost_ends_the_others_at_join_timeout_never_a_hang(cluster):
    from harness import FAKE_WORKER
    c = await cluster(2, *LOSE, nnodes_spec="1:2", rdzv_conf=f"{LOSE_CONF},join_timeout=4",
                      command=[*FAKE_WORKER, "--steps", "400", "--step-time", "0.05"])
    survivor, _ = await lose_a_node(c, lost=0)  # node 0 hosts the rendezvous store
    assert await survivor.finish(timeout=30) == 1
    reason = survivor.named("state_changed", to="FAILED")[0]["reason"]
    assert f"rendezvous store {c.endpoint} unreachable for join_timeout 4 s" in reason, reason


async def test_with_the_store_served_apart_the_job_goes_on_without_any_node(cluster):
    """``supervisord-ft rdzv-store`` on its own (a head node's): no node hosts the store, so the
    node that would have (the endpoint's address is every node's here) may be lost too."""
    from harness import FAKE_WORKER
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{free.getsockname()[1]}"
    store = await asyncio.create_subprocess_exec(sys.executable, "-m", "supervisord_ft", "rdzv-store", endpoint,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            assert json.loads(await store.stdout.readline())["event"] == "rdzv_store_listening"
        c = await cluster(2, *LOSE, nnodes_spec="1:2", rdzv_conf=LOSE_CONF, endpoint=endpoint,
                          command=[*FAKE_WORKER, "--print-env", "--steps", "400", "--step-time", "0.05"])
        await goes_on_alone(*await lose_a_node(c, lost=0))
        store.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert json.loads(await store.stdout.readline()) == {"event": "rdzv_store_stopped", "signal": "SIGTERM"}
            assert await store.wait() == 0
    finally:
        if store.returncode is None:
            store.kill()
            await store.wait()


def at(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


# The partition: both nodes' ranks block in a collective that never completes (gloo alone would
# wait 30 minutes); each node's hang watchdog sees it within hang_timeout. The link stays down
# longer than the rendezvous store's read_timeout, so node 1's store connections fail and are
# replaced; within join_timeout of the first node rejoining, the link must come back.
HANG, READ, DOWN = 4, 5, 10


async def test_a_partitioned_node_is_detected_and_the_job_resumes_when_the_link_returns(cluster, tmp_path):
    netns.require()
    sizes = ("--steps", "400")
    with netns.bridged(2) as net:
        c = await cluster(2, *COMMON, *sizes, "--hang-timeout", str(HANG), net=net,
                          rdzv_conf=f"{FAST},read_timeout={READ},join_timeout=120")
        for d in c.nodes:
            await d.wait_for(lambda e: e.get("worker_event") == "step" and e["worker_step"] >= 3)
        cut = datetime.now().timestamp()
        net.link(1, up=False)
        detected = [await d.wait_for(lambda e: e["event"] == "state_changed" and e["to"] == "RECOVERING")
                    for d in c.nodes]
        await asyncio.sleep(DOWN - (datetime.now().timestamp() - cut))  # the scenario: a 10 s cut
        restored = datetime.now().timestamp()
        net.link(1, up=True)
        running = [await d.wait_for(lambda e: e["event"] == "state_changed" and e["to"] == "RUNNING"
                                    and e["attempt"] == 1, timeout=120) for d in c.nodes]
        assert await c.finish() == [0, 0]
    assert final_sha(*c.nodes) == await reference_sha(tmp_path, 2, *sizes)
    for e in detected:  # by the hang watchdog (or the other node's news), not by gloo's timeout
        assert at(e) - cut < HANG + 3, (e, cut)
    for e in running:  # the documented bound: read_timeout + the reconnect pause + a round
        assert at(e) - restored < READ + 10, (e, restored)


async def test_one_restart_budget_is_spent_alike_on_every_node_and_its_end_fails_them_all(cluster):
    from harness import FAKE_WORKER
    # Global rank 1 fails at its first step in every attempt; max_restarts 2 allows two relaunches.
    c = await cluster(2, "--restart-backoff", "0", "--max-restarts", "2", "--startup-window", "0",
                      "--max-stalled-attempts", "0",  # the same failure each time: the budget alone judges
                      command=[*FAKE_WORKER, "--steps", "400", "--step-time", "0.05", "--fail-rank", "1",
                               "--fail-at-step", "1", "--fail-attempts", "9"])
    assert await c.finish(timeout=120) == [1, 1]
    for d in c.nodes:
        assert d.events[-1]["restarts"] == 2
        assert [e["restarts"] for e in d.named("rendezvous_round")] == [0, 1, 2]
        assert "max_restarts (2)" in d.named("state_changed", to="FAILED")[0]["reason"]


async def test_a_stop_signal_while_waiting_for_the_other_nodes_stops_at_once(cluster):
    c = await cluster(2, *COMMON, start=[0])
    await c.nodes[0].wait_for(lambda e: e["event"] == "rendezvous_helper_started")
    c.nodes[0].signal(signal.SIGTERM)
    assert await c.finish(timeout=30) == [143]
    assert c.nodes[0].states() == ["LAUNCHING", "STOPPING", "STOPPED"]


async def test_with_min_max_nodes_a_node_that_arrives_later_is_taken_in_at_once(cluster):
    from harness import FAKE_WORKER
    c = await cluster(2, "--restart-backoff", "0", "--grace-period", "2", nnodes_spec="1:2",
                      rdzv_conf="last_call_timeout=1", start=[0],
                      command=[*FAKE_WORKER, "--print-env", "--steps", "400", "--step-time", "0.05"])
    first = c.nodes[0]
    alone = await first.wait_for(lambda e: e.get("worker_event") == "env")
    assert alone["env"]["WORLD_SIZE"] == "1"
    await c.start_node(1)
    for d in c.nodes:
        env = await d.wait_for(lambda e: e.get("worker_event") == "env" and e["env"]["WORLD_SIZE"] == "2",
                               timeout=60)
        assert env["env"]["GROUP_WORLD_SIZE"] == "2"
    reason = first.named("state_changed", to="RECOVERING")[0]["reason"]
    assert reason == "a node is waiting to join"
    c.nodes[1].signal(signal.SIGTERM)
    assert await c.finish() == [143, 143]
    assert all(d.events[-1]["restarts"] == 0 for d in c.nodes)  # a bigger group spends no restart


def _saved(directory, *steps: int) -> None:
    import torch
    from supervisord_ft import checkpoints as ck
    directory.mkdir(exist_ok=True)
    for step in steps:
        ck.atomic_write(ck.checkpoint_path(directory, step),
                        lambda fh, s=step: torch.save({"step": s, "w": torch.zeros(4)}, fh))


async def test_checkpoint_dirs_that_are_not_shared_end_the_run_saying_so_and_set_nothing_aside(cluster, tmp_path):
    """Each node its own dir (a mistake users make): no step is held by both. The nodes agreed on
    a step one did not have, it failed twice, an intact checkpoint was set aside and the run
    ended as a crash loop; now every node ends at once with exit 3, naming the dirs' steps."""
    from harness import FAKE_WORKER
    _saved(tmp_path / "ck0", 10, 20)
    _saved(tmp_path / "ck1", 30)
    c = await cluster(2, "--restart-backoff", "0",
                      per_node=[["--checkpoint-dir", str(tmp_path / f"ck{n}")] for n in (0, 1)],
                      command=[*FAKE_WORKER, "--steps", "5"])
    assert await c.finish(timeout=120) == [3, 3]
    for d in c.nodes:
        reason = d.named("state_changed", to="FAILED")[0]["reason"]
        # by group rank, which the rendezvous gives in the order the nodes join
        assert any(f"no checkpoint step that every node holds (newest by node: {votes})" in reason
                   for votes in ("[20, 30]", "[30, 20]")), reason
        assert d.named("checkpoint_set_aside") == [] and d.named("worker_started") == []
    assert sorted(p.name for p in (tmp_path / "ck1").iterdir()) == ["checkpoint_step_30.pt"]


async def test_the_nodes_resume_from_the_newest_step_they_all_hold(cluster, tmp_path):
    from harness import FAKE_WORKER
    _saved(tmp_path / "ck0", 10, 20)
    _saved(tmp_path / "ck1", 10, 30)
    c = await cluster(2, "--restart-backoff", "0",
                      per_node=[["--checkpoint-dir", str(tmp_path / f"ck{n}")] for n in (0, 1)],
                      command=[*FAKE_WORKER, "--steps", "5"])
    assert await c.finish(timeout=120) == [0, 0]
    for n, d in enumerate(c.nodes):
        assert d.named("checkpoint_agreed")[0]["step"] == 10
        assert d.named("launching")[0]["resume_from"] == str(tmp_path / f"ck{n}" / "checkpoint_step_10.pt")
