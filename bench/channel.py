"""12. The per-rank channel: what a look costs the daemon, what the looks cost training, and a
hang's onset → running again against torchrun, which never declares one.

- Look cost: 4 torch processes (gloo, world size 1, ``TORCH_FR_BUFFER_SIZE=20``, 50 all-reduces
  done) each open 16 of torch's worker servers: 64 sockets, all real flight recorders. The bench
  process (torch-free) times ``Looker.look`` of all 64 and ``diagnosis.collect`` of all 64 (the
  bound a hang adds before a teardown), wall and its own CPU per round; also at 8 ranks.
- Cost to training: the daemon runs ``tests/jobs/ddp_plain.py --steps 400 --step-time 0 --print
  none`` (2 ranks, no output: every rank is silent, so with ``--hang-timeout 3`` the daemon looks
  at both about every 3 s, the worst case) with ``--channel`` and ``--no-channel``, alternating,
  per pair. Metric: the ranks' runtime (``worker_exited`` ``runtime``, max over ranks).
- Hang: rank 1 spins at step 100 on the first attempt; ours (``--hang-timeout 10``, standby on)
  from the events; torchrun is watched until rank 0 has printed nothing for W s, then killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from supervisord_ft import diagnosis
from supervisord_ft.progress import Looker

from .launch import ROOT, descendants, iso_time, job_env, kill_group, run_daemon
from .report import Result, Summary, Table, ratios

NAME = "channel"
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
JOB = str(ROOT / "tests" / "jobs" / "ddp_plain.py")
PER_PROC = 16
STEADY_LOOK_S = 30.0  # a silent rank is looked at this often in steady state

SERVER = r"""
import os, sys, time, torch, torch.distributed as dist
from torch._C._distributed_c10d import _WorkerServer
dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
t = torch.ones(16)
for _ in range(50):
    dist.all_reduce(t)
servers = [_WorkerServer(p) for p in sys.argv[2:]]
print("ready", flush=True)
sys.stdin.read()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def look_cost(procs: int, rounds: int) -> dict[str, object]:
    tmp = tempfile.mkdtemp(prefix="sftb-")
    started: list[asyncio.subprocess.Process] = []
    try:
        sockets, pids = {}, {}
        for p in range(procs):
            paths = [f"{tmp}/p{p}s{i}.sock" for i in range(PER_PROC)]
            proc = await asyncio.create_subprocess_exec(
                PY, "-c", SERVER, str(free_port()), *paths, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                env=job_env({"TORCH_FR_BUFFER_SIZE": "20"}),
                start_new_session=True)
            started.append(proc)
            for i, path in enumerate(paths):
                sockets[p * PER_PROC + i] = path
                pids[p * PER_PROC + i] = proc.pid
        for proc in started:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if line.strip() != b"ready":
                raise RuntimeError(f"server process {proc.pid} did not start: {line!r}")
        out: dict[str, object] = {}
        for n in sorted({8, len(sockets)}):
            ranks = list(range(n))
            socks, ps = {r: sockets[r] for r in ranks}, {r: pids[r] for r in ranks}
            looker = Looker(socks, ps, progress={})
            for kind in ("look", "collect"):
                wall, cpu, bad = [], [], 0
                for _ in range(rounds + 1):  # the first round is a warm-up, dropped
                    w0, c0 = time.perf_counter(), time.process_time()
                    if kind == "look":
                        seen = await looker.look(ranks)
                        bad = sum(1 for s in seen.values() if s.channel)
                    else:
                        reps = await diagnosis.collect(socks, ps, outside=False)
                        bad = sum(1 for r in reps.values() if r.stacks is None or r.trace is None)
                    wall.append((time.perf_counter() - w0) * 1e3)
                    cpu.append((time.process_time() - c0) * 1e3)
                out[f"{kind}/{n}"] = {"ranks": n, "wall_ms": Summary.of(wall[1:], p99=True),
                                      "cpu_ms": Summary.of(cpu[1:], p99=True), "unanswered_last_round": bad,
                                      "wall_samples": wall[1:], "cpu_samples": cpu[1:]}
        return out
    finally:
        for proc in started:
            kill_group(proc)
            await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def training_cost(pairs: int, steps: int) -> dict[str, object]:
    job = ["--steps", str(steps), "--step-time", "0", "--print", "none"]
    base = ["--no-standby", "--num-workers", "2", "--hang-timeout", "3", "--startup-timeout", "30"]
    runtime: dict[str, list[float]] = {"channel": [], "no-channel": []}
    for i in range(pairs):
        order = ("channel", "no-channel") if i % 2 == 0 else ("no-channel", "channel")
        for mode in order:
            evs = await run_daemon([*base, f"--{mode}"], job, 300)
            exits = [e for e in evs if e["event"] == "worker_exited"]
            if len(exits) != 2 or any(e["returncode"] != 0 for e in exits):
                raise RuntimeError(f"{mode}: ranks did not both finish: {exits}")
            if any(e["event"] == "hang_detected" for e in evs):
                raise RuntimeError(f"{mode}: a hang was declared on a healthy run")
            runtime[mode].append(max(e["runtime"] for e in exits))
    r = ratios(runtime["channel"], runtime["no-channel"])
    sps = {m: [steps / t for t in v] for m, v in runtime.items()}
    per_step_ms = [(a - b) / steps * 1e3 for a, b in zip(runtime["channel"], runtime["no-channel"])]
    return {"runtime_s": runtime, "ratio": r, "steps_per_s": sps,
            "steps_per_s_ratio": ratios(sps["channel"], sps["no-channel"]),
            "extra_ms_per_collective": Summary.of(per_step_ms)}


HANG_JOB = ["--steps", "300", "--step-time", "0.02", "--print", "rank0", "--hang-rank", "1",
            "--hang-step", "100", "--hang-mode", "spin"]


async def hang_ours() -> dict[str, object]:
    evs = await run_daemon(["--num-workers", "2", "--hang-timeout", "10"], HANG_JOB, 240)
    first = lambda name: next((e for e in evs if e["event"] == name), None)  # noqa: E731
    det, diag, td = first("hang_detected"), first("hang_diagnosed"), first("teardown")
    if det is None:
        raise RuntimeError("ours: no hang_detected")
    t_det = iso_time(det["timestamp"])
    rec = next((e for e in evs if e["event"] == "recovered" and iso_time(e["timestamp"]) >= t_det), None)
    done = [e for e in evs if e["event"] == "worker_exited" and e.get("returncode") == 0]
    return {"timeout_s": det["timeout"], "silent_for_s": det["silent_for"],
            "diagnosed_s": diag and diag["seconds"], "laggards": diag and diag.get("laggards"),
            "teardown_s": td and td["seconds"],
            "detected_to_recovered_s": rec and iso_time(rec["timestamp"]) - t_det,
            "recovered_seconds_field": rec and rec["seconds"],
            "onset_to_recovered_s": rec and iso_time(rec["timestamp"]) - t_det + det["silent_for"],
            "finished_ok": len(done) >= 2}


async def hang_torchrun(wait_s: float) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "3", JOB, *HANG_JOB,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=job_env({}), cwd=ROOT,
        start_new_session=True)
    assert proc.stdout is not None
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    try:
        while True:
            last = lines[-1][0] if lines else t0
            left = last + wait_s - time.monotonic()
            if left <= 0:
                break
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), left)
            except asyncio.TimeoutError:
                break
            if not line:
                break
            lines.append((time.monotonic(), line.decode(errors="replace").strip()))
        still = proc.returncode is None
        last_step = next((l for _, l in reversed(lines) if l.startswith("epoch")), None)
        waited = time.monotonic() - (lines[-1][0] if lines else t0)
    finally:
        # torchrun starts its ranks in sessions of their own: they would outlive its group and
        # hold its stdout open (asyncio's wait() waits for the pipe too).
        ranks = descendants(proc.pid)
        kill_group(proc)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
    return {"still_running": still, "silent_waited_s": waited, "last_line": last_step,
            "declared_hang": False, "lines": len(lines)}


async def run(quick: bool) -> Result:
    rounds, pairs, wait_s = (5, 1, 30.0) if quick else (20, 3, 60.0)
    looks = await look_cost(4, rounds)
    t1 = Table(f"A look and a diagnosis, from the daemon (per round, {rounds} rounds, 4 torch processes × "
               f"{PER_PROC} worker servers, flight recorder 20 entries)",
               ["what", "ranks", "wall ms p50 [min–max]", "wall p99", "daemon CPU ms p50", "CPU ms per rank",
                f"CPU per s, every rank looked at every {STEADY_LOOK_S:g} s", "unanswered"])
    for key, v in looks.items():
        kind, n = key.split("/")
        cpu = v["cpu_ms"].median
        per_s = f"{cpu / STEADY_LOOK_S / 1e3 * 100:.4f}% of a core" if kind == "look" else "— (once per hang)"
        t1.add("Looker.look" if kind == "look" else "diagnosis.collect (stacks + trace)", n,
               v["wall_ms"].fmt(digits=1), f"{v['wall_ms'].p99:.1f}", f"{cpu:.1f}", f"{cpu / int(n):.2f}", per_s,
               v["unanswered_last_round"])
    t1.notes.append("At most one look per hang limit per silent rank: at --hang-timeout 3 the same 64-rank look "
                    f"is {looks['look/64']['cpu_ms'].median / 3 / 10:.3f}% of a core.")
    cost = await training_cost(pairs, 400)
    t2 = Table(f"Cost to training: ddp_plain 400 steps, 2 silent ranks, --hang-timeout 3 (looks every ~3 s), "
               f"{pairs} pair(s), alternating",
               ["pair", "runtime s, channel", "runtime s, no channel", "ratio channel/no-channel",
                "steps/s channel", "steps/s no channel"])
    for i, (a, b) in enumerate(zip(cost["runtime_s"]["channel"], cost["runtime_s"]["no-channel"])):
        t2.add(i + 1, f"{a:.2f}", f"{b:.2f}", f"{a / b:.3f}", f"{400 / a:.1f}", f"{400 / b:.1f}")
    t2.add("median", "", "", cost["ratio"].fmt(), f"ratio {cost['steps_per_s_ratio'].fmt()}", "")
    t2.notes.append("runtime = worker_exited runtime, max over the 2 ranks; it includes torch's import and "
                    f"init_process_group. Extra per collective (step): {cost['extra_ms_per_collective'].fmt(' ms', 2)}.")
    ho = await hang_ours()
    ht = await hang_torchrun(wait_s)
    t3 = Table("A rank spinning at step 100 (2 ranks, 0.02 s steps): onset → running again",
               ["launcher", "hang limit s", "silent for s at detection", "diagnosis s", "teardown s",
                "detected → recovered s", "onset → recovered s", "outcome"])
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    t3.add("ours (--hang-timeout 10, standby on)", fmt(ho["timeout_s"]), fmt(ho["silent_for_s"]),
           fmt(ho["diagnosed_s"]), fmt(ho["teardown_s"]), fmt(ho["detected_to_recovered_s"]),
           fmt(ho["onset_to_recovered_s"]),
           f"laggard(s) {ho['laggards']}; finished: {'yes' if ho['finished_ok'] else 'no'}")
    t3.add("torchrun --max-restarts 3", "none", "—", "—", "—", "never", "never",
           f"no hang declared; {'still stuck' if ht['still_running'] else 'exited'} after "
           f"{ht['silent_waited_s']:.0f} s without output, then killed by the bench (last: {ht['last_line']!r})")
    return Result(NAME, [t1, t2, t3], {"looks": looks, "training": cost, "hang_ours": ho, "hang_torchrun": ht})
