"""The per-rank channel: torch's worker server in a real rank, and hostile answers to the daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import ROOT
from supervisord_ft import channel, diagnosis, flight
from supervisord_ft.channel import ChannelError, Sockets, ask
from supervisord_ft.errors import ConfigError

# A rank that is not ours: gloo with one process, a few all_reduces, then it waits on stdin.
RANK = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%d")
for _ in range(30):
    dist.all_reduce(torch.ones(4))
def waiting_for_the_test():
    sys.stdin.readline()
print("ready", flush=True)
waiting_for_the_test()
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sockets():
    s = Sockets()
    yield s
    s.close()


def start_rank(path: str, env: dict[str, str], tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "rank.py"
    script.write_text(RANK % free_port())
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env=channel.cold_env({**env, channel.CHANNEL: path,
                                                  channel.FR_BUFFER: "20"}))
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
    return proc


def end(proc: subprocess.Popen) -> bytes:
    _, err = proc.communicate(b"\n", timeout=30)
    return err


async def test_a_cold_rank_opens_its_channel_with_no_change_to_its_script_path_or_environment(
        sockets, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    script = tmp_path / "env.py"
    script.write_text("import os, sys, json\nimport torch.distributed\n"
                      "print(json.dumps([os.environ.get('PYTHONPATH'), 'SUPERVISORD_FT_PYTHONPATH' "
                      "in os.environ, os.environ.get('OWN_SITECUSTOMIZE'), sys.path, "
                      "os.path.exists(os.environ['SUPERVISORD_FT_CHANNEL'])]))\n")
    env = {**os.environ, "PYTHONPATH": str(own)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=channel.cold_env({**env, channel.CHANNEL: sockets.path(0, 0)}))
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                           env={**env, channel.CHANNEL: sockets.path(1, 0)})
    assert out.stderr == "" and plain.stderr == ""  # the server's "listening" line is not the job's
    cold, alone = __import__("json").loads(out.stdout), __import__("json").loads(plain.stdout)
    assert cold[:4] == alone[:4] == [str(own), False, "ran", alone[3]]  # path and env as the job gave
    assert cold[4] is True and alone[4] is False  # only the bootstrap opened a channel


async def test_a_real_ranks_trace_and_stacks_are_read_and_parsed(sockets, tmp_path):
    path = sockets.path(0, 0)
    proc = start_rank(path, dict(os.environ), tmp_path)
    try:
        trace = flight.parse_trace((await ask(path, "fr_trace_json", 2)).body)
        stacks = (await ask(path, "dump_traceback", 2)).body.decode()
    finally:
        err = end(proc)
    assert err == b""  # and nothing at exit either
    group = trace.groups["0"]
    assert (group.enqueued, group.completed, group.op, group.waiting) == (30, 30, "all_reduce", False)
    assert len(trace.entries) == 20  # TORCH_FR_BUFFER_SIZE as the daemon set it
    frames = flight.main_thread(flight.parse_stacks(stacks))
    assert str(flight.innermost_own(frames)) == "rank.py:7 in waiting_for_the_test"


async def test_a_job_that_sets_its_own_buffer_size_or_server_keeps_both(sockets, tmp_path):
    own_socket = str(sockets.dir / "users-own.sock")
    script = tmp_path / "own.py"
    script.write_text(RANK.replace("import os, sys, torch, torch.distributed as dist",
                                   "import os, sys, torch, torch.distributed as dist\n"
                                   "from torch._C._distributed_c10d import _WorkerServer\n"
                                   f"server = _WorkerServer({own_socket!r})") % free_port())
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path,
                            env=channel.cold_env({**os.environ, channel.CHANNEL: sockets.path(0, 0),
                                                  channel.FR_BUFFER: "5"}))
    try:
        assert proc.stdout.readline() == b"ready\n"
        ours = flight.parse_trace((await ask(sockets.path(0, 0), "fr_trace_json", 2)).body)
        theirs = flight.parse_trace((await ask(own_socket, "fr_trace_json", 2)).body)
    finally:
        end(proc)
    assert len(ours.entries) == len(theirs.entries) == 5


async def serve(path: str, answer) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await answer(writer)
        finally:
            writer.close()
    return await asyncio.start_unix_server(handle, path)


async def hostile(path: str, answer, timeout: float = 0.5) -> tuple[str | bytes, float]:
    server = await serve(path, answer)
    t0 = time.monotonic()
    try:
        async with server:
            got: str | bytes = (await ask(path, "dump_traceback", timeout)).body
    except ChannelError as exc:
        got = str(exc)
    return got, time.monotonic() - t0


async def test_hostile_answers_cost_at_most_the_bound_and_say_what_was_not_got(sockets):
    async def silent(w):
        await asyncio.sleep(30)

    async def dies_mid_answer(w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nThread 0x1 (most")
        await w.drain()

    async def garbage(w):
        w.write(b"\x00\xff garbage that is not HTTP\r\n\r\n")

    async def huge(w):
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 104857600\r\n\r\n")
        chunk = b"  File \"x.py\", line 1 in f\n" * 4096
        for _ in range(100 * (1 << 20) // len(chunk)):
            w.write(chunk)
            await w.drain()

    cases = {"silent": silent, "dies": dies_mid_answer, "garbage": garbage}
    results = {name: await hostile(sockets.path(0, i), answer) for i, (name, answer) in enumerate(cases.items())}
    assert results["silent"][0] == "no answer within 0.5 s" and results["silent"][1] < 1.0
    assert results["dies"][0].startswith("answer cut short")
    assert "not an HTTP answer" in results["garbage"][0]
    server = await serve(sockets.path(0, 9), huge)
    async with server:
        answer = await ask(sockets.path(0, 9), "dump_traceback", 5)
    assert answer.truncated and len(answer.body) == channel.MAX_ANSWER
    with pytest.raises(ChannelError, match="no socket"):
        await ask(sockets.path(5, 5), "ping", 0.5)


async def test_a_diagnosis_of_ranks_that_cannot_answer_names_what_is_missing(sockets, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        reports = await diagnosis.collect({0: sockets.path(0, 0)}, {0: sleeper.pid}, outside=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    d = diagnosis.diagnose(reports)
    assert d.laggards == [] and reports[0].stacks is None
    assert any("no socket" in p for p in reports[0].problems)
    assert d.summary == f"rank 0 gave no stack ({reports[0].problems[0]}; py-spy: not installed)" or \
        d.summary.startswith("rank 0 gave no stack (channel: no socket")


def test_a_tmpdir_too_deep_for_a_socket_path_is_a_one_line_usage_error(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(ConfigError, match="too deep for a Unix socket"):
        Sockets()
    assert list(deep.iterdir()) == []  # nothing left behind


def test_traces_that_are_not_ours_are_value_errors_never_crashes():
    for body in (b"", b"[]", b"{\"entries\": 5}", b"\xff\xfe", b"{\"pg_status\": {\"0\": {\"last_enqueued_collective\": \"x\"}}}"):
        with pytest.raises(ValueError):
            flight.parse_trace(body)


def test_the_boot_dir_holds_only_the_bootstrap():
    assert sorted(p.name for p in channel.BOOT_DIR.iterdir() if p.suffix == ".py") == ["sitecustomize.py"]
    assert channel.BOOT_DIR.is_relative_to(ROOT)
