"""The console for a person, through a real pseudo-terminal, read back as a screen (pyte)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte

from harness import FAKE_WORKER, ROOT

COLS, ROWS = 120, 40
CRASHING = [*FAKE_WORKER, "--steps", "60", "--step-time", "0.02", "--fail-rank", "1",
            "--fail-at-step", "10", "--fail-code", "3"]
ESCAPE = re.compile(rb"\x1b[\[\]()#;?]*[0-9;]*[A-Za-z@`]")


def run_on_terminal(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                    terminal: bool = True, timeout: float = 60) -> tuple[int, bytes]:
    """Run the daemon with stdout (and stderr) on a pseudo-terminal, or on a pipe; all it wrote."""
    argv = [sys.executable, "-m", "supervisord_ft", "run", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--run-dir", str(tmp_path / "run"), "--restart-backoff", "0", *args]
    inherited = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    full_env = {**inherited, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", **(env or {})}
    if terminal:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    else:
        master, slave = os.pipe()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=tmp_path,
                            env=full_env, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=max(0.1, deadline - time.monotonic())), bytes(out)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def screen_of(raw: bytes) -> list[str]:
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    stream.feed(raw.replace(b"\n", b"\r\n"))  # the pty's onlcr, as a real terminal shows it
    return [line.rstrip() for line in screen.display if line.strip()]


def test_the_console_shows_a_crash_and_its_recovery_in_a_few_lines_with_a_status_area(tmp_path):
    rc, raw = run_on_terminal(tmp_path, "--num-workers", "2", "--", *CRASHING)
    assert rc == 0
    lines = screen_of(raw)
    text = "\n".join(lines)
    assert len(lines) < 20, text  # not one line per step per rank
    assert not any(re.search(r"\bstep \d+\b", line) and "rank 0" in line for line in lines), text
    failed = next(i for i, line in enumerate(lines) if "rank 1 failed" in line)
    assert "exit code 3" in lines[failed]
    assert "rank 1 failing at step 10" in lines[failed + 1]  # its last stderr line, with it
    assert any("recovered in" in line for line in lines), text
    assert "DONE" in lines[-2] and "restarts 1/3" in lines[-1] and "step 60" in lines[-1], text
    assert b"\x1b[" in raw  # colours and redraws: it is a terminal


def colours(raw: bytes) -> set[int]:
    """The colour parameters (foreground or background) of every SGR sequence written."""
    params = [int(p) for sgr in re.findall(rb"\x1b\[([0-9;]*)m", raw) for p in sgr.split(b";") if p]
    return {p for p in params if 30 <= p <= 49 or 90 <= p <= 107}


def test_no_color_and_a_dumb_terminal_are_honoured(tmp_path):
    _, raw = run_on_terminal(tmp_path, "--", *CRASHING)
    assert colours(raw)  # coloured by default
    _, raw = run_on_terminal(tmp_path, "--", *CRASHING, env={"NO_COLOR": "1"})
    assert colours(raw) == set() and b"recovered in" in raw  # bold may stay: NO_COLOR is colour
    rc, raw = run_on_terminal(tmp_path, "--", *FAKE_WORKER, "--steps", "3", env={"TERM": "dumb"})
    assert rc == 0 and b"\x1b" not in raw and b"DONE" in raw


def test_console_format_on_a_pipe_writes_plain_lines(tmp_path):
    rc, raw = run_on_terminal(tmp_path, "--log-format", "console", "--", *CRASHING, terminal=False)
    assert rc == 0
    assert b"\x1b" not in raw and b"\r" not in raw
    text = raw.decode()
    assert "rank 1 failed" in text and "recovered in" in text and "DONE" in text
