"""Warm standby ranks: a script cannot tell a standby from a cold start, and the pool heals."""

from __future__ import annotations

import asyncio
import os
import py_compile
import shutil
import signal
import sys
import zipapp
from datetime import datetime
from pathlib import Path

import pytest

from harness import FAKE_WORKER, ROOT, Daemon, idle, pid_alive, pool_ready
from supervisord_ft import procfs
from supervisord_ft.config import Config
from supervisord_ft.errors import EXIT_NO_REQUEUE
from supervisord_ft.standby import SETTLE_AFTER

PROBE = Path(__file__).with_name("probe.py")
# Attempt 0: both ranks wait for PROBE_GO, then rank 1 fails; later attempts print where they run.
GATED = """
import os, sys
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
        go.read(1)
    sys.exit(1 if os.environ["RANK"] == "1" else 0)
try:
    print("cwd:", os.getcwd(), flush=True)
except FileNotFoundError:
    print("cwd: gone", flush=True)
"""

FAST = ["--standby", "--preload", "json,ctypes", "--restart-backoff", "0", "--grace-period", "5"]


async def start_gated(daemon, tmp_path: Path, command: list[str], *args: str, within: str | None = None,
                      wrap: list[str] | None = None, **env: str) -> tuple[Daemon, int]:
    """Start a daemon whose first attempt waits for one byte on the FIFO ``PROBE_GO`` (the fd
    returned), so that the pool can fill first; ``env`` is the ranks' too."""
    go = tmp_path / "go"
    os.mkfifo(go)
    fd = os.open(go, os.O_RDWR)  # held: a reader's open never blocks, its read waits for a byte
    env["PROBE_GO"] = str(go)
    os.environ.update(env)
    try:
        d = await daemon(*FAST, *args, command=command, within=within, wrap=wrap)
    finally:
        for name in env:
            del os.environ[name]
    return d, fd


# How each form of a Python command runs the probe: its arguments, and the probe's __file__.
FORMS = {"script": (["probe.py"], "probe.py"), "module": (["-m", "probe"], "probe.py"),
         "compiled": (["probe.pyc"], "probe.pyc"), "zipapp": (["probe.pyz"], "probe.pyz/__main__.py"),
         "directory": (["probe_dir"], "probe_dir/__main__.py")}


async def start_probe(daemon, tmp_path: Path, end: str, form: str, *args: str) -> tuple[Daemon, int]:
    shutil.copy(PROBE, tmp_path / "probe.py")
    (tmp_path / "probe_dir").mkdir()
    shutil.copy(PROBE, tmp_path / "probe_dir" / "__main__.py")
    zipapp.create_archive(tmp_path / "probe_dir", tmp_path / "probe.pyz")  # as a pex or shiv app
    py_compile.compile(str(PROBE), cfile=str(tmp_path / "probe.pyc"), doraise=True)
    command = [sys.executable, *FORMS[form][0], "x", "--flag"]
    return await start_gated(daemon, tmp_path, command, *args, PROBE_END=end)


def lines(d: Daemon, attempt: int, rank: int) -> list[object]:
    """What the rank printed: each line, or the fields of its JSON line."""
    return [e.get("line") or {k: v for k, v in e.items() if k not in ("timestamp", "restart", "attempt")}
            for e in d.named("worker_output", attempt=attempt, rank=rank)]


@pytest.mark.parametrize("form,end,code", [("script", "raise", 1), ("module", "exit 3", 3),
                                           ("compiled", "raise", 1), ("zipapp", "raise", 1),
                                           ("directory", "exit 3", 3)])
async def test_a_script_cannot_tell_a_standby_from_a_cold_start(daemon, tmp_path, form, end, code):
    d, go = await start_probe(daemon, tmp_path, end, form, "--max-restarts", "1")
    standbys = await pool_ready(d)
    os.write(go, b"g")  # attempt 0 (cold) ends; attempt 1 runs in the standbys
    assert await d.finish() == EXIT_NO_REQUEUE  # the same failure twice at start-up: a crash loop
    handed = {e["standby_pid"]: e["rank"] for e in d.named("standby_state", to="handed_out")}
    assert set(handed) == standbys
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == standbys
    for rank in (0, 1):
        cold, warm = lines(d, 0, rank), lines(d, 1, rank)
        assert cold == warm  # the report, the traceback or the exit line: equal, line for line
        report = cold[0]
        assert report["argv"][1:] == ["x", "--flag"] and report["name"] == "__main__"
        assert report["file"] == str(tmp_path / FORMS[form][1]) and report["cwd"] == str(tmp_path)
        assert report["deathsig"] == signal.SIGKILL and report["session_leader"]
    for attempt in (0, 1):
        assert [e["returncode"] for e in d.named("worker_exited", attempt=attempt)] == [code, -signal.SIGTERM]
    # A failed rank's fast exit: after the job's atexit handlers, before the interpreter's teardown.
    assert lines(d, 1, 1)[-2:] == (["ValueError: rank 1 fails", "atexit"] if end == "raise"
                                   else ["atexit", "teardown"])
    assert not any(pid_alive(p) for p in standbys | idle(d))  # the refilled pool died with the run


SPAWNS = """
import multiprocessing, os, signal, sys

def square(x):
    return x * x

if __name__ == "__main__":  # a spawned child imports this file again, as __mp_main__
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        print("squares", pool.map(square, [2, 3]), flush=True)
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        if os.environ["RANK"] == "0":
            signal.pause()  # until the teardown's SIGTERM
        with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
            go.read(1)
        sys.exit(1)
"""


BUSY_THEN_WAIT = """
import os, time
end = time.monotonic() + 2.0
while time.monotonic() < end:  # a rank's start-up: every core it can get
    pass
print("started", flush=True)
with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
    go.read(1)  # then it waits, on a peer or a store, using no CPU
"""


# Without CAP_SYS_NICE (and RLIMIT_NICE 0, the default) a standby could not leave SCHED_IDLE.
NO_SYS_NICE = ["setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
async def test_where_idle_priority_cannot_be_left_the_pool_fills_once_the_ranks_stop_using_the_cpu(
        daemon, tmp_path):
    (tmp_path / "busy.py").write_text(BUSY_THEN_WAIT)
    d, go = await start_gated(daemon, tmp_path, [sys.executable, "busy.py"], "--standby-early",
                              wrap=NO_SYS_NICE)
    await pool_ready(d)
    os.write(go, b"gg")
    assert await d.finish() == 0
    names = [e["event"] for e in d.events]
    started = [i for i, e in enumerate(d.events) if e["event"] == "worker_output" and e.get("line") == "started"]
    first_standby = names.index("standby_state")
    assert len(started) == 2 and first_standby > max(started)  # not while both ranks kept the cores busy
    launched = datetime.fromisoformat(d.named("launching")[0]["timestamp"])
    filled = datetime.fromisoformat(d.events[first_standby]["timestamp"])
    assert (filled - launched).total_seconds() < SETTLE_AFTER  # nor only at the latest bound


SCHEDULING = """
import os, sys
print("scheduled", sorted({(os.sched_getscheduler(int(t)), os.getpriority(os.PRIO_PROCESS, int(t)))
                           for t in os.listdir("/proc/self/task")}), flush=True)
""" + GATED


@pytest.mark.skipif(not procfs.can_leave_idle_priority(), reason="no CAP_SYS_NICE: a standby "
                    "could not leave SCHED_IDLE, so the pool waits for the ranks to settle")
async def test_standbys_start_with_the_launch_at_idle_priority_and_a_warm_rank_is_scheduled_as_a_cold_one(
        daemon, tmp_path):
    (tmp_path / "sched.py").write_text(SCHEDULING)
    d, go = await start_gated(daemon, tmp_path, [sys.executable, "sched.py"], "--standby-early")
    standbys = await pool_ready(d)
    assert {os.sched_getscheduler(pid) for pid in standbys} == {os.SCHED_IDLE}
    launched = datetime.fromisoformat(d.named("launching")[0]["timestamp"])
    first = datetime.fromisoformat(d.named("standby_state", to="starting")[0]["timestamp"])
    assert (first - launched).total_seconds() < 1.0  # with the launch, not once it settled
    os.write(go, b"gg")
    assert await d.finish() == 0
    cold, warm = lines(d, 0, 0)[0], lines(d, 1, 0)[0]
    assert cold == warm == f"scheduled [({os.SCHED_OTHER}, {os.getpriority(os.PRIO_PROCESS, 0)})]"
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == standbys


async def test_a_script_in_a_standby_can_start_spawned_children(daemon, tmp_path):
    # What a DataLoader or a CUDA job does: the child re-imports the main script by its path.
    (tmp_path / "spawns.py").write_text(SPAWNS)
    d, fd = await start_gated(daemon, tmp_path, [sys.executable, "spawns.py"])
    standbys = await pool_ready(d)
    os.write(fd, b"g")
    assert await d.finish() == 0
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == standbys
    for attempt in (0, 1):
        assert [e["line"] for e in d.named("worker_output", attempt=attempt, rank=1)] == ["squares [4, 9]"]


async def test_a_standby_killed_or_hung_while_idle_is_replaced_and_never_handed_a_rank(daemon, tmp_path):
    d, go = await start_probe(daemon, tmp_path, "exit 0", "script")
    killed, stopped = sorted(await pool_ready(d))
    os.kill(killed, signal.SIGKILL)
    await d.wait_for(lambda e: e["event"] == "standby_state" and e["standby_pid"] == killed and e["to"] == "dead")
    replacement = (await d.wait_for(lambda e: e["event"] == "standby_state" and e["to"] == "idle"
                                    and e["standby_pid"] not in (killed, stopped)))["standby_pid"]
    os.kill(stopped, signal.SIGSTOP)
    os.kill(d.named("worker_started", rank=1)[0]["pid"], signal.SIGKILL)  # attempt 0 fails
    assert await d.finish() == 0
    dead = {e["standby_pid"]: e["reason"] for e in d.named("standby_state", to="dead")}
    assert dead[killed] == "exited with -9 while idle: replaced"
    assert "no answer to its order" in dead[stopped]
    started = {e["pid"] for e in d.named("worker_started", attempt=1)}
    assert replacement in started and not started & {killed, stopped}
    assert len(d.named("standby_not_used", rank=d.named("worker_started", pid=replacement)[0]["rank"] ^ 1)) >= 1
    # a standby is no rank until it is handed one: no worker event ever named the other two
    assert not {e.get("pid") for e in d.events if e["event"].startswith("worker_")} & {killed, stopped}


async def test_standbys_ended_with_the_run_are_no_warning_and_those_that_die_are(daemon, tmp_path):
    d, go = await start_probe(daemon, tmp_path, "exit 0", "script")
    killed, kept = sorted(await pool_ready(d))
    os.kill(killed, signal.SIGKILL)
    await d.wait_for(lambda e: e["event"] == "standby_state" and e["standby_pid"] == killed and e["to"] == "dead")
    d.signal(signal.SIGTERM)
    assert await d.finish() == 143
    levels = {e["standby_pid"]: (e["level"], e["reason"]) for e in d.named("standby_state", to="dead")}
    assert levels[killed][0] == "warning"
    assert levels[kept] == ("info", "run ended")  # the daemon's own choice: nothing to alert on


async def test_standbys_die_with_the_daemon(daemon, tmp_path):
    d, go = await start_probe(daemon, tmp_path, "exit 0", "script")
    standbys = await pool_ready(d)
    assert await d.sigkill(within=2) == []
    deadline = asyncio.get_running_loop().time() + 2
    while any(pid_alive(p) for p in standbys) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)  # observing the kernel: there is no event for another's death
    assert not any(pid_alive(p) for p in standbys)


async def test_a_standby_that_cannot_start_disables_the_pool_and_ranks_start_cold(daemon, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "dies.py").write_text("raise SystemExit(5)\n")  # kills the interpreter
    config = tmp_path / "run.toml"
    path = os.pathsep.join([str(tmp_path / "lib"), str(ROOT)])
    config.write_text(f'[env]\nPYTHONPATH = "{path}"\n')
    d, go = await start_probe(daemon, tmp_path, "exit 0", "script", "--config", str(config),
                              "--preload", "json,no_such_module,dies")
    disabled = await d.wait_for(lambda e: e["event"] == "standby_disabled")
    assert "exited with 5 before it was ready" in disabled["reason"]
    os.kill(d.named("worker_started", rank=1)[0]["pid"], signal.SIGKILL)
    assert await d.finish() == 0
    assert {e["reason"].split(":")[0] for e in d.named("standby_not_used", attempt=None)} >= {"pool disabled"}
    assert len(d.named("worker_started", attempt=1)) == 2 and d.named("standby_state", to="idle") == []
    assert len(d.named("standby_disabled")) == 1


async def test_a_preload_whose_import_never_returns_is_killed_at_startup_timeout(daemon, tmp_path):
    """It was never declared dead (alive after 10 minutes), and the daemon printed a bare
    TimeoutError from a task; now it is killed at the ranks' startup_timeout, said once."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "forever.py").write_text("import time\ntime.sleep(3600)\n")
    config = tmp_path / "run.toml"
    config.write_text(f'[env]\nPYTHONPATH = "{os.pathsep.join([str(tmp_path / "lib"), str(ROOT)])}"\n')
    d = await daemon(*FAST, "--config", str(config), "--preload", "json,forever", "--startup-timeout", "3",
                     command=[*FAKE_WORKER, "--steps", "100", "--step-time", "0.1"])
    disabled = await d.wait_for(lambda e: e["event"] == "standby_disabled", timeout=60)
    assert "was not ready within 3 s (startup_timeout): killed" in disabled["reason"]
    assert await d.finish() == 0
    starting = {e["standby_pid"] for e in d.named("standby_state", to="starting")}
    assert starting and not any(pid_alive(p) for p in starting)
    assert {e["standby_pid"] for e in d.named("standby_state", to="dead")} == starting
    assert len(d.named("standby_disabled")) == 1 and "Traceback" not in d.stderr


async def test_a_non_python_command_always_starts_cold(daemon, tmp_path):
    d = await daemon(*FAST, command=["/bin/sh", "-c", "exit 0"])
    assert await d.finish() == 0
    assert {e["reason"] for e in d.named("standby_not_used")} == {
        "not a `python script.py` or `python -m module` command"}
    assert d.named("standby_state") == []


async def test_a_working_directory_deleted_under_the_job_is_relaunched_warm_as_cold(daemon, tmp_path):
    """The daemon's cwd (a scratch dir) is removed while the job runs, then a rank fails: a cold
    start runs in the deleted directory, and so does a standby now (it failed to spawn, twice,
    and the run ended as a crash loop)."""
    scratch = tmp_path / "scratch"
    (tmp_path / "gated.py").write_text(GATED)
    d, fd = await start_gated(daemon, tmp_path, [sys.executable, str(tmp_path / "gated.py")],
                              "--run-dir", str(tmp_path / "run"),
                              "--checkpoint-dir", str(tmp_path / "ckpt"), within="scratch")
    standbys = await pool_ready(d)
    scratch.rmdir()
    os.write(fd, b"gg")  # a byte for each rank: attempt 0 fails; attempt 1 runs in the standbys
    assert await d.finish() == 0
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == standbys
    assert [e["line"] for e in d.named("worker_output", attempt=1, rank=0)] == ["cwd: gone"]


OWN_MODULES = ("standby", "worker", "runner", "channel", "lines", "store", "rdzv", "startup", "contract")
IMPORTS_ITS_OWN = f"""
import importlib, os, sys
print([importlib.import_module(name).WHOSE for name in {OWN_MODULES!r}], flush=True)
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
        go.read(1)
    sys.exit(1 if os.environ["RANK"] == "1" else 0)
"""


async def test_a_script_next_to_modules_named_like_ours_imports_its_own_warm_as_cold(daemon, tmp_path):
    """A project with its own ``standby.py`` or ``worker.py`` beside the script: a warm rank got
    our package under those names (the runner's modules sat in its ``sys.modules``)."""
    for name in OWN_MODULES:
        (tmp_path / f"{name}.py").write_text(f"WHOSE = 'user {name}'\n")
    (tmp_path / "train.py").write_text(IMPORTS_ITS_OWN)
    d, fd = await start_gated(daemon, tmp_path, [sys.executable, "train.py"], within=".")
    standbys = await pool_ready(d)
    os.write(fd, b"gg")  # attempt 0 (cold) fails; attempt 1 runs in the standbys
    assert await d.finish() == 0
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == standbys
    theirs = str([f"user {name}" for name in OWN_MODULES])
    for rank in (0, 1):
        assert [e["line"] for e in d.named("worker_output", attempt=0, rank=rank)] == [theirs]
        assert [e["line"] for e in d.named("worker_output", attempt=1, rank=rank)] == [theirs]


SETS_THREADS = """
import os, sys
{before}
import torch
{after}
print("threads", torch.get_num_threads(), flush=True)
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
        go.read(1)
    sys.exit(1 if os.environ["RANK"] == "1" else 0)
"""


@pytest.mark.parametrize("before,after,threads", [
    ("os.environ['OMP_NUM_THREADS'] = '1'", "", 1),
    ("os.environ['MKL_NUM_THREADS'] = '1'; import importlib; importlib.import_module('torch.nn')", "", 1),
    ("os.environ['OMP_NUM_THREADS'] = '99'", "", None),  # MKL's cap: the cores
    ("", "os.environ['OMP_NUM_THREADS'] = '1'", None),  # set after the import: torch's default
])
async def test_thread_counts_a_script_sets_before_importing_torch_apply_warm_as_cold(
        daemon, tmp_path, before, after, threads):
    """A script that sets ``OMP_NUM_THREADS`` before ``import torch`` got torch's default count
    in a standby (torch was imported there first)."""
    # On one core 1 thread is torch's default too: warm and cold are still compared, line for line.
    (tmp_path / "train.py").write_text(SETS_THREADS.format(before=before, after=after))
    # the launcher's own count (cores): torchrun's 1 for several ranks, ours too, would hide the script's
    d, fd = await start_gated(daemon, tmp_path, [sys.executable, "train.py"], "--preload", "torch",
                              within=".", OMP_NUM_THREADS=str(os.cpu_count()))
    standbys = await pool_ready(d)
    os.write(fd, b"gg")  # attempt 0 (cold) fails; attempt 1 runs in the standbys
    assert await d.finish() == 0
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == standbys
    # stdout only: a rank torn down while torch's threads exit may say "FATAL: exception not
    # rethrown" (glibc) on stderr
    cold = [e["line"] for e in d.named("worker_output", attempt=0, stream="stdout")]
    assert [e["line"] for e in d.named("worker_output", attempt=1, stream="stdout")] == cold
    expected = threads or os.cpu_count()
    assert cold == [f"threads {expected}"] * 2


LEARNER = """
import os, sys
print("had:", "xml.dom.minidom" in sys.modules, "mylib" in sys.modules, flush=True)
import xml.dom.minidom, mylib
import torch.distributed  # the channel opens: its first module list has them (the next: 0.25 s on)
""" + GATED
DEFAULT_PRELOAD = ",".join(Config.preload)


@pytest.mark.parametrize("memory", ["2048", "64"])
async def test_standbys_learn_what_the_job_imported_but_never_its_own_code(daemon, tmp_path, memory):
    """With ``preload`` at its default, the next standbys import what the ranks imported from the
    standard library and installed packages, so the warm rank has it before its first line; a
    module of the job's own is never among them. Standbys over ``standby_memory`` drop them."""
    (tmp_path / "learner.py").write_text(LEARNER)
    (tmp_path / "mylib.py").write_text("VALUE = 1\n")
    d, go = await start_gated(daemon, tmp_path, [sys.executable, "learner.py"], "--preload",
                              DEFAULT_PRELOAD, "--standby-memory", memory, "--max-restarts", "1")
    learnt = await d.wait_for(lambda e: e["event"] == "preload_learnt")
    assert "xml" not in learnt["packages"] and learnt["modules"] > 100  # stdlib: counted, not named
    if memory == "64":  # the standbys with them hold more: replaced by standbys without them
        await d.wait_for(lambda e: e["event"] == "preload_learnt_dropped")
    await pool_ready(d, learnt=learnt["total"] if memory == "2048" else 0)
    os.write(go, b"gg")  # a byte for each rank: attempt 0 (cold) ends with rank 1's exit 1
    assert await d.finish() == 0
    assert lines(d, 0, 0)[0] == "had: False False"
    dropped = d.named("preload_learnt_dropped")
    if memory == "64":
        assert len(dropped) == 1 and "standby_memory: 64" in dropped[0]["reason"]
        assert lines(d, 1, 0)[0] == "had: False False"
    else:
        assert dropped == [] and lines(d, 1, 0)[0] == "had: True False"
    assert {e["rank"] for e in d.named("standby_state", to="handed_out")} == {0, 1}
