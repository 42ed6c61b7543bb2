"""16. Rendezvous load: N simulated nodes through one rendezvous store on loopback (issue 19).

For each N, one store host process (the libuv ``TCPStore`` our helper hosts) and one process of
N simulated nodes, each a thread (:mod:`bench.rdzv_sim`), no daemons, no workers:

- ours: each node our helper's rendezvous member (``supervisord_ft_standby.rdzv.Member``: torch's
  handler, the bell, the news thread, the knock, the round's keys);
- torch: each node torch's ``DynamicRendezvousHandler`` as torchrun's agent drives it: join, then
  ``num_nodes_waiting`` every 0.1 s (torchrun's default ``--monitor-interval``; the handler reads
  the store at most once a second), a node whose workers failed joins again at once;
- torch-named: the same with its events named as our helper names them: torch's handler spends
  16 ms of CPU per event on ``inspect.stack()``, which N threads pay on this machine's 2 cores and
  N nodes each on their own; this side shows torch's pace without that.

Per N and side: the first round (all threads started → the last node in the round); a quiet
round held for a while (the store's CPU and calls per second while nothing happens: heartbeats,
polls); then ``failures`` times, one node's workers fail: → every node has heard (ours: the news
pushed through the store; torch: a node waiting) → every node in the next round. For each phase
the store host's CPU (from /proc), the calls made to it and the bytes they carried (every client
connection is counted). The store host's memory at its start and its peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from supervisord_ft import procfs

from .launch import PYTHON, ROOT, STDERR_TAIL, BenchError, cpu_seconds, job_env, kill_group
from .report import Result, Summary, Table

NAME = "rdzv_load"
IMPLS = ("ours", "torch", "torch-named")
MONITOR_INTERVAL = 0.1  # torchrun's default --monitor-interval
JOIN_TIMEOUT = 180  # seconds, for each phase: a side that takes longer at some N is a row saying so
SHIM = Path(__file__).resolve().parent / "numeric_names.c"


def numeric_names(directory: Path) -> dict[str, str]:
    """The environment that preloads :file:`numeric_names.c`, built here; none without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return {}
    lib = directory / "numeric_names.so"
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(lib), str(SHIM), "-ldl"],
                          capture_output=True, timeout=60)
    return {"LD_PRELOAD": str(lib)} if done.returncode == 0 else {}


async def measure(impl: str, nodes: int, failures: int, quiet_s: float, env: dict[str, str],
                  workdir: Path) -> dict[str, Any]:
    timeout = JOIN_TIMEOUT * (failures + 2) + quiet_s
    stderr = open(workdir / f"{impl}-{nodes}.log", "wb")
    store = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.rdzv_sim", "store", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        env=env, cwd=ROOT, start_new_session=True)
    sim = None
    try:
        port = json.loads(await asyncio.wait_for(store.stdout.readline(), 60))["port"]
        rss_start = int(procfs.status_field(store.pid, "VmRSS").split()[0])
        cfg = {"impl": impl, "nodes": nodes, "failures": failures, "quiet_s": quiet_s, "timeout": JOIN_TIMEOUT,
               "monitor_interval": MONITOR_INTERVAL, "store_pid": store.pid, "port": port,
               "member": {"endpoint": f"127.0.0.1:{port}", "run_id": "bench", "min_nodes": nodes,
                          "max_nodes": nodes, "conf": {"is_host": "0", "join_timeout": str(JOIN_TIMEOUT)},
                          "local_addr": "127.0.0.1", "master_port": 0}}
        sim = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "bench.rdzv_sim", "nodes", json.dumps(cfg), stdout=subprocess.PIPE, stderr=stderr,
            env=env, cwd=ROOT, start_new_session=True)
        out, _ = await asyncio.wait_for(sim.communicate(), timeout)
        if sim.returncode != 0:
            tail = (workdir / f"{impl}-{nodes}.log").read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace")
            said = [line for line in tail.splitlines() if line.startswith(f"{impl} at {nodes} nodes: ")]
            raise BenchError(f"{said[-1] if said else f'{impl} at {nodes} nodes: exit {sim.returncode}'}\n{tail}")
        result = json.loads(out)
        result["store_rss_start_mib"] = rss_start / 1024
        result["store_peak_rss_mib"] = int(procfs.status_field(store.pid, "VmHWM").split()[0]) / 1024
        result["store_cpu_s"] = cpu_seconds(store.pid)
        return result
    finally:
        for proc in (sim, store):
            if proc is not None and proc.returncode is None:
                kill_group(proc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 10)
        stderr.close()


def per_round(runs: list[dict[str, Any]], key: str) -> Summary:
    return Summary.of([f[key] for r in runs for f in r["failures"]])


async def run(quick: bool) -> Result:
    sizes, failures, quiet_s = ((8,), 1, 1.0) if quick else ((8, 32, 128), 3, 10.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-rdzv-"))
    try:
        shim = numeric_names(workdir)
        env = job_env(shim)
        samples: dict[int, dict[str, list[dict[str, Any]] | str]] = {}
        for nodes in sizes:
            samples[nodes] = {}
            for impl in IMPLS:
                try:
                    samples[nodes][impl] = [await measure(impl, nodes, failures, quiet_s, env, workdir)]
                except BenchError as exc:  # a side that cannot form its rounds at this N: a result
                    samples[nodes][impl] = str(exc).splitlines()[0].split(" nodes: ", 1)[-1]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not any(isinstance(runs, list) for by_impl in samples.values() for runs in by_impl.values()):
        raise BenchError(f"no side completed at any N: {samples}")
    times = Table("Rendezvous round times at N simulated nodes (one store, loopback)",
                  ["N", "side", "first round s", "failure → all heard s", "failure → next round s"])
    load = Table("The store's load per round and while a round runs",
                 ["N", "side", "store CPU s, first round", "store CPU s per re-round", "calls per re-round",
                  "MB per re-round", "quiet: calls/s, store CPU %", "store RSS MiB start → peak",
                  "nodes' CPU s per node"])
    data: dict[str, Any] = {"sizes": list(sizes), "failures_per_run": failures, "quiet_s": quiet_s,
                            "numeric_names": bool(shim), "monitor_interval": MONITOR_INTERVAL}
    for nodes in sizes:
        for impl in IMPLS:
            runs = samples[nodes][impl]
            if isinstance(runs, str):
                times.add(nodes, impl, f"failed: {runs}", "", "")
                load.add(nodes, impl, *[""] * 7)
                data[f"{impl}@{nodes}"] = {"error": runs}
                continue
            s = {"first_round_s": Summary.of([r["first"]["round_s"] for r in runs]),
                 "all_heard_s": per_round(runs, "all_heard_s"), "next_round_s": per_round(runs, "next_round_s"),
                 "first_store_cpu_s": Summary.of([r["first"]["store_cpu_s"] for r in runs]),
                 "reround_store_cpu_s": per_round(runs, "store_cpu_s"), "reround_ops": per_round(runs, "ops"),
                 "reround_mb": Summary.of([f["bytes"] / 1e6 for r in runs for f in r["failures"]]),
                 "quiet_ops_per_s": Summary.of([r["quiet"]["ops"] / r["quiet"]["wall_s"] for r in runs]),
                 "quiet_store_cpu_pct": Summary.of([100 * r["quiet"]["store_cpu_s"] / r["quiet"]["wall_s"]
                                                    for r in runs]),
                 "store_rss_start_mib": Summary.of([r["store_rss_start_mib"] for r in runs]),
                 "store_peak_rss_mib": Summary.of([r["store_peak_rss_mib"] for r in runs]),
                 "nodes_cpu_s_per_node": Summary.of([r["nodes_cpu_s"] / nodes for r in runs])}
            times.add(nodes, impl, s["first_round_s"].fmt(), s["all_heard_s"].fmt(), s["next_round_s"].fmt())
            load.add(nodes, impl, s["first_store_cpu_s"].fmt(digits=2), s["reround_store_cpu_s"].fmt(digits=2),
                     s["reround_ops"].fmt(digits=0), s["reround_mb"].fmt(digits=1),
                     f"{s['quiet_ops_per_s'].median:.0f}, {s['quiet_store_cpu_pct'].median:.1f}",
                     f"{s['store_rss_start_mib'].median:.0f} → {s['store_peak_rss_mib'].median:.0f}",
                     s["nodes_cpu_s_per_node"].fmt(digits=3))
            data[f"{impl}@{nodes}"] = {**s, "runs": runs}
    times.notes.append(f"One run per N and side, {failures} failure(s) each (a re-round: median [min–max] over "
                       f"them). torch: DynamicRendezvousHandler, num_nodes_waiting every {MONITOR_INTERVAL:g} s "
                       "(torchrun's default pace); torch-named: the same, its events named without "
                       "inspect.stack(). All N nodes are threads of one process on this machine: their own CPU "
                       "(last column of the next table) is spent on its cores, not on N machines'.")
    if not shim:
        times.notes.append("No C compiler: the stores' clients asked DNS for their own names (see numeric_names.c).")
    return Result(NAME, [times, load], data)
