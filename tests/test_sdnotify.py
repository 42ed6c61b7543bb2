"""systemd's notify protocol, with a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from harness import FAKE_WORKER
from supervisord_ft.sdnotify import Notifier


def listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def pending(sock: socket.socket) -> list[str]:
    """Every datagram already queued, without waiting."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def receive(sock: socket.socket, into: list[str]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        into.append((await loop.sock_recv(sock, 4096)).decode())


async def test_the_daemon_notifies_ready_status_watchdog_and_stopping(daemon, tmp_path: Path):
    sock = listener(str(tmp_path / "notify"))
    got: list[str] = []
    receiver = asyncio.create_task(receive(sock, got))
    try:
        d = await daemon("--num-workers", "2", "--max-restarts", "1",
                         command=[*FAKE_WORKER, "--steps", "30", "--step-time", "0.05",
                                  "--fail-rank", "1", "--fail-at-step", "3"],
                         env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
        worker = (await d.wait_for(lambda e: e["event"] == "worker_started"))["pid"]
        with open(f"/proc/{worker}/environ", "rb") as fh:
            assert b"NOTIFY_SOCKET" not in fh.read()  # consumed by the daemon, not inherited
        assert await d.finish() == 0
    finally:
        receiver.cancel()
        got += pending(sock)
        sock.close()
    messages = [m for m in got if m != "WATCHDOG=1"]
    assert messages[0] == "READY=1\nSTATUS=RUNNING, attempt 0"
    assert sum("READY=1" in m for m in messages) == 1
    statuses = [line for m in messages for line in m.split("\n") if line.startswith("STATUS=")]
    assert any(s.startswith("STATUS=RECOVERING, attempt 0, step ") for s in statuses)
    assert "STATUS=RUNNING, attempt 1" in statuses
    assert any(s.startswith("STATUS=RUNNING, attempt 1, step ") for s in statuses)
    assert messages[-1].startswith("STOPPING=1\nSTATUS=DONE, attempt 1, step ")
    assert got.count("WATCHDOG=1") >= 3  # every 0.1 s over a run of a second or more


async def test_watchdog_pings_come_from_the_loop_so_a_frozen_loop_stops_them(tmp_path: Path):
    sock = listener(str(tmp_path / "notify"))
    notifier = Notifier(str(tmp_path / "notify"), watchdog_interval=0.02)
    pinger = asyncio.create_task(notifier.watchdog())
    try:
        async with asyncio.timeout(5):
            assert await asyncio.get_running_loop().sock_recv(sock, 64) == b"WATCHDOG=1"
        pending(sock)
        time.sleep(0.3)  # freeze the loop (on purpose: this is the fault under test)
        assert pending(sock) == []  # 15 intervals passed and nothing was sent
        async with asyncio.timeout(5):
            assert await asyncio.get_running_loop().sock_recv(sock, 64) == b"WATCHDOG=1"
    finally:
        pinger.cancel()
        notifier.close()
        sock.close()


def test_an_abstract_socket_address_is_used_as_given():
    name = f"supervisord-ft-test-{os.getpid()}"
    sock = listener("\0" + name)
    notifier = Notifier("@" + name, None)
    try:
        notifier.send("READY=1")
        assert pending(sock) == ["READY=1"]
    finally:
        notifier.close()
        sock.close()


def test_no_listener_or_a_full_queue_never_raises_nor_blocks(tmp_path: Path):
    gone = Notifier(str(tmp_path / "nobody-here"), None)
    gone.send("READY=1")
    gone.close()
    sock = listener(str(tmp_path / "never-read"))  # a systemd that stopped reading
    notifier = Notifier(str(tmp_path / "never-read"), None)
    t0 = time.monotonic()
    for _ in range(5000):
        notifier.send("STATUS=" + "x" * 200)
    assert time.monotonic() - t0 < 2
    assert 0 < len(pending(sock)) < 5000  # the queue filled up and the rest was dropped
    notifier.close()
    sock.close()


def test_the_watchdog_is_armed_only_for_this_process_and_the_variables_are_consumed():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    notifier = Notifier.from_env(env)
    assert notifier is not None and notifier.watchdog_interval is None and env == {}
    notifier.close()
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_env(env)
    assert notifier is not None and notifier.watchdog_interval == 15.0
    notifier.close()
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}) is None
