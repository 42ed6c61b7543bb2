"""The daemon's own I/O is never on the training's critical path: a stdout reader that stalls or
goes away, a run dir whose disk fills up, standard descriptors closed at start-up, and floats
that are not JSON."""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from harness import FAKE_WORKER, ROOT, read_events, strict_json
from supervisord_ft.jsonline import dumps
from supervisord_ft.logs import EventsFile

STDOUT_PIPE = 1 << 16  # Linux's default pipe capacity


def at(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


async def until_full(fd: int, timeout: float = 10) -> None:
    """Wait until the pipe ``fd`` reads from is full: its writer is stuck.

    Not a byte count: the kernel fills a pipe page by page, and how short of 64 KiB a full pipe
    stays depends on how the writes fell (57,222 and 65,417 bytes were both seen full). Full is
    more than half of it held, unchanged for 0.3 s while the daemon writes a `status` event
    every 0.1 s and a line per worker line.
    """
    held, since = -1, time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while True:
                now = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), "little")
                if now != held:
                    held, since = now, time.monotonic()
                elif held > STDOUT_PIPE // 2 and time.monotonic() - since > 0.3:
                    return
                await asyncio.sleep(0.01)  # a pipe's fill level is no event anyone can await
    except TimeoutError:
        raise AssertionError(f"the daemon's stdout pipe never filled: {held} bytes") from None


async def read_all(fd: int) -> list[bytes]:
    """Become the reader again: every line from ``fd`` until EOF."""
    reader = asyncio.StreamReader(limit=1 << 24)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", 0))
    try:
        return [line async for line in reader]
    finally:
        transport.close()


async def test_a_stdout_reader_that_stops_reading_delays_neither_detection_nor_the_workers(daemon, tmp_path):
    r, w = os.pipe()
    try:
        d = await daemon("--num-workers", "2", "--max-restarts", "1", "--restart-backoff", "0",
                         "--poll-interval", "0.1",
                         command=[*FAKE_WORKER, "--flood-lines", "30000", "--flood-rate", "10000",
                                  "--flood-attempts", "1", "--steps", "20", "--step-time", "0.02"],
                         stdout=w)
    finally:
        os.close(w)
    victim = await d.follow(lambda e: e["event"] == "worker_started" and e["rank"] == 1)
    await d.follow(lambda e: e["event"] == "worker_output" and e["rank"] == 0)  # rank 0 floods
    await until_full(r)  # from here on nothing more fits into the daemon's stdout
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    exited = await d.follow(lambda e: e["event"] == "worker_exited" and e["rank"] == 1, timeout=10)
    await d.follow(lambda e: e["event"] == "recovered", timeout=20)
    flood = json.loads((tmp_path / "flood-0.json").read_text())  # rank 0 flooded all along

    reading = asyncio.create_task(read_all(r))
    assert await d.finish() == 0
    stdout = [line.decode() for line in await reading]
    assert at(exited) - killed_at < 1.0, (exited, killed_at)
    # Seconds rank 0 waited on a full pipe: ~0 here, but a loaded 2-core machine can starve the
    # daemon for a moment; blocked on a daemon that waits for stdout it would be seconds.
    assert flood["blocked"] < 0.5, flood
    file_lines = d.events_file.read_text().splitlines()
    events = [strict_json(line) for line in file_lines]
    assert events[-1]["event"] == "supervisor_exit"
    dropped = [strict_json(line) for line in stdout if '"stdout_dropped"' in line]
    assert dropped and dropped[0]["lines"] > 0 and dropped[0]["first_lost"] <= dropped[0]["last_lost"]
    rest = iter(file_lines)  # stdout is events.jsonl with lines left out, in the same order
    assert all(line.rstrip("\n") in rest for line in stdout)


async def test_a_stdout_reader_that_goes_away_is_said_once_and_the_run_recovers(daemon):
    r, w = os.pipe()
    try:
        d = await daemon("--num-workers", "2", "--restart-backoff", "0",
                         command=[*FAKE_WORKER, "--steps", "30", "--step-time", "0.02",
                                  "--fail-rank", "1", "--fail-at-step", "10"], stdout=w)
    finally:
        os.close(w)
    async with asyncio.timeout(10):
        assert await asyncio.to_thread(os.read, r, 300)  # like `| head -c 300`: read, then exit
    os.close(r)
    assert await d.finish() == 0
    events = read_events(d.events_file)
    assert [e["event"] for e in events].count("stdout_closed") == 1
    assert [e for e in events if e["event"] == "recovered"]
    assert events[-1]["event"] == "supervisor_exit" and events[-1]["state"] == "DONE"
    assert d.stderr.count("stdout failed: Broken pipe") == 1, d.stderr


async def test_a_daemon_started_with_stdin_stdout_and_stderr_closed_trains_to_done(daemon):
    worker_stdin = [sys.executable, "-c", "import os; print(os.readlink('/proc/self/fd/0'))"]
    d = await daemon("--num-workers", "2", command=worker_stdin, redirect="<&- >&- 2>&-")
    assert await d.finish() == 0
    events = read_events(d.events_file)
    assert [e["line"] for e in events if e["event"] == "worker_output"] == ["/dev/null"] * 2
    assert events[-1]["event"] == "supervisor_exit" and events[-1]["state"] == "DONE"


@pytest.fixture
def small_disk(tmp_path: Path):
    """``tmp_path/run`` on a tmpfs of 1 MiB: a disk the test can fill up for real."""
    run = tmp_path / "run"
    run.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(run)],
                             capture_output=True, text=True)
    # The suite runs as root (CI does): a full disk is tested for real, never skipped.
    assert mounted.returncode == 0, f"cannot mount a tmpfs (the suite needs root): {mounted.stderr.strip()}"
    yield run
    subprocess.run(["umount", "--lazy", str(run)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


async def test_a_full_run_dir_disk_never_stops_recovery_and_the_log_says_what_it_lost(daemon, small_disk):
    d = await daemon("--num-workers", "2", "--restart-backoff", "0",
                     command=[*FAKE_WORKER, "--steps", "150", "--step-time", "0.02"])
    await d.wait_for(lambda e: e.get("worker_event") == "step")
    filler = fill(small_disk)
    await d.wait_for(lambda e: e["event"] == "log_write_failed")
    os.kill(next(e["pid"] for e in d.named("worker_started", rank=1)), signal.SIGKILL)
    await d.wait_for(lambda e: e["event"] == "recovered")
    filler.unlink()
    gap = await d.wait_for(lambda e: e["event"] == "log_gap")
    assert await d.finish() == 0

    events = read_events(d.events_file)  # every line whole and strict: no half line was left
    assert d.events_file.read_bytes().endswith(b"\n")
    assert [e for e in events if e["event"] == "log_gap"] == [gap]
    assert gap["lines"] > 0 and "No space left on device" in gap["reason"]
    assert gap["first_lost"] <= gap["last_lost"] <= gap["timestamp"]
    missing = [e for e in d.events if e not in events and e["event"] != "log_write_failed"]
    assert len(missing) == gap["lines"], (missing, gap)  # stdout got them all
    assert missing[0]["timestamp"] == gap["first_lost"] and missing[-1]["timestamp"] == gap["last_lost"]
    assert events[-1]["event"] == "supervisor_exit" and events[-1]["state"] == "DONE"


@pytest.fixture
def freezable_disk(tmp_path: Path):
    """``tmp_path/run`` on a file system of its own (ext4 on a loop device) and a function that
    freezes it (``fsfreeze``: every write waits, as on a dead NFS server) or thaws it."""
    image, run = tmp_path / "disk.img", tmp_path / "run"
    run.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(64 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop", str(image), str(run)], capture_output=True, text=True)
    # Root may mount a loop file system here and in CI; a machine that cannot fails, not skips.
    assert mounted and mounted.returncode == 0, \
        f"cannot mount a loop file system: {(made.stderr or mounted and mounted.stderr).strip()}"
    frozen = [False]

    def freeze(on: bool) -> None:
        subprocess.run(["fsfreeze", "-f" if on else "-u", str(run)], check=True, timeout=10)
        frozen[0] = on
    try:
        yield run, freeze
    finally:
        if frozen[0]:
            freeze(False)
        subprocess.run(["umount", "--lazy", str(run)], check=True)


async def test_a_frozen_run_dir_file_system_never_stops_recovery_or_a_stop(daemon, freezable_disk):
    """Every write to events.jsonl waits forever: the loop must not (it wrote it synchronously)."""
    run, freeze = freezable_disk
    d = await daemon("--num-workers", "2", "--restart-backoff", "0", "--grace-period", "5",
                     command=[*FAKE_WORKER, "--steps", "100000", "--step-time", "0.02"])
    await d.wait_for(lambda e: e.get("worker_event") == "step")
    freeze(True)
    os.kill(next(e["pid"] for e in d.named("worker_started", rank=1)), signal.SIGKILL)
    recovered = await d.wait_for(lambda e: e["event"] == "recovered", timeout=30)
    await d.wait_for(lambda e: e.get("worker_event") == "step" and e["attempt"] == recovered["attempt"])
    d.signal(signal.SIGTERM)
    await d.wait_for(lambda e: e["event"] == "supervisor_exit", timeout=30)
    failed = await d.wait_for(lambda e: e["event"] == "log_write_failed" and "unwritten at exit" in e["reason"])
    assert failed["path"] == str(run / "events.jsonl")
    assert d.named("log_write_failed") == [failed]  # until then the lines waited, none lost
    freeze(False)  # the writer thread's write returns; only then can the process end
    assert await d.finish() == 143
    text = (run / "events.jsonl").read_bytes()
    assert text.endswith(b"\n") and all(strict_json(line) for line in text.splitlines())


def test_lines_a_stalled_file_system_has_no_room_for_are_counted_in_a_log_gap(freezable_disk):
    run, freeze = freezable_disk
    events = EventsFile(run / "events.jsonl", max_bytes=1000)
    line = lambda i: dumps({"timestamp": f"t{i:03}", "event": "e", "pad": "x" * 60}) + "\n"  # noqa: E731
    events.append(line(0), "t000")
    assert events.drain() == 0
    freeze(True)
    for i in range(1, 41):  # ~90 bytes each: the first (being written) and ~11 queued wait, the rest are lost
        events.append(line(i), f"t{i:03}")
    [failed] = events.news()
    assert failed["event"] == "log_write_failed" and "a stalled file system" in failed["reason"]
    assert events.drain(0.2) > 0  # nothing is written while frozen
    freeze(False)
    events.append(line(41), "t041")
    assert events.drain() == 0
    events.close()
    written = [strict_json(x) for x in (run / "events.jsonl").read_bytes().splitlines()]
    [gap] = [e for e in written if e["event"] == "log_gap"]
    kept = [e["timestamp"] for e in written if e["event"] == "e"]
    assert events.news() == [gap] and kept[0] == "t000" and kept[-1] == "t041"
    assert gap["lines"] == 42 - len(kept) and gap["first_lost"] == f"t{len(kept) - 1:03}"
    assert gap["last_lost"] == "t040" and written.index(gap) == len(written) - 2  # just before the next


async def test_nan_and_infinity_from_workers_are_logged_as_strict_json(daemon):
    script = ("from supervisord_ft_worker.contract import report_progress; report_progress(1, loss=float('nan'));"
              "print('{\"event\": \"raw\", \"grad\": [1.5, -Infinity], \"x\": {\"y\": Infinity}}')")
    d = await daemon(command=[sys.executable, "-c", script])
    assert await d.finish() == 0
    events = read_events(d.events_file)
    assert d.events == [strict_json(json.dumps(e)) for e in d.events]  # stdout parsed strictly too
    step = next(e for e in events if e.get("worker_event") == "step")
    assert step["loss"] is None and step["loss_nonfinite"] == "nan"
    raw = next(e for e in events if e.get("worker_event") == "raw")
    assert raw["grad"] == [1.5, None] and raw["grad_nonfinite"] == [None, "-inf"]
    assert raw["x"] == {"y": None, "y_nonfinite": "inf"}


def test_the_nonfinite_representation_keeps_finite_data_as_it_was():
    value = {"a": 1.0, "b": [math.nan, [2.0, -math.inf]], "c": "NaN"}
    assert strict_json(dumps(value)) == {"a": 1.0, "b": [None, [2.0, None]],
                                         "b_nonfinite": ["nan", [None, "-inf"]], "c": "NaN"}


def test_a_worker_using_the_contract_prints_strict_json_for_a_nonfinite_loss():
    script = "from supervisord_ft_worker.contract import report_progress; report_progress(7, loss=float('inf'))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert strict_json(out) == {"event": "step", "step": 7, "loss": None, "loss_nonfinite": "inf"}
