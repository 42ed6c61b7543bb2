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
from supervisord_ft import envvars

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
    assert "cause: rank 1: exit_code: rank 1 failing at step 10\n" in text  # the explained cause
    recovered = next(line for line in text.splitlines() if line.startswith("recovered in"))
    assert re.search(r"\(detection [\d.]+ s, diagnosis [\d.]+ s, jit_wait [\d.]+ s, teardown [\d.]+ s, "
                     r"relaunch [\d.]+ s, first_progress [\d.]+ s\)$", recovered), recovered


def test_a_hang_shows_its_diagnosis_and_where_the_stack_files_are(tmp_path):
    rc, raw = run_on_terminal(tmp_path, "--log-format", "console", "--hang-timeout", "0.5",
                              "--grace-period", "0.3", "--", *FAKE_WORKER, "--steps", "30",
                              "--step-time", "0.02", "--fail-rank", "1", "--fail-at-step", "5",
                              "--hang", "--ignore-sigterm", terminal=False)
    assert rc == 0
    lines = raw.decode().splitlines()
    hung = next(i for i, line in enumerate(lines) if line.startswith("group hung: "))
    assert re.fullmatch(r"group hung: no rank showed progress within 0\.5 s; rank 1 silent longest "
                        r"\([\d.]+ s\)", lines[hung]), lines[hung]
    # The fake worker is not a torch job: no channel; py-spy (the test extra's, found beside
    # the daemon's interpreter) reads where it is from outside.
    assert lines[hung + 1].startswith("hang diagnosed: rank 1 at fake_worker.py:"), lines[hung:hung + 4]
    at = next(i for i in range(hung + 2, len(lines)) if lines[i].startswith("  stacks: "))
    stacks = Path(lines[at].removeprefix("  stacks: "))
    assert stacks.parts[-1] == "attempt-0" and (tmp_path / stacks / "rank-1.txt").is_file()
    assert lines[at + 1].startswith("RECOVERING  rank 1 hung: ")


# -- the view, fed by hand --------------------------------------------------------------------
class Sink:
    """A pipe's face: plain lines, no terminal."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, line: str) -> bool:
        self.text += line
        return True

    def isatty(self) -> bool:
        return False


def printed(*events: dict) -> list[str]:
    """The lines the console prints for ``events`` (the final status line left out)."""
    from supervisord_ft.console import ConsoleView

    sink = Sink()
    view = ConsoleView(sink)
    for e in ({"event": "launching", "level": "info", "attempt": 0, "restart": 0}, *events):
        view(e)
    return sink.text.splitlines()


def hang(rank: int, silent_for: float, **fields) -> dict:
    return {"event": "hang_detected", "level": "error", "rank": rank, "restart": 0, "attempt": 0,
            "silent_for": silent_for, "before_first_step": False, "timeout": 90.0, **fields}


SUMMARY = "rank 1 at job.py:7 in spin_forever, outside any collective; ranks 0, 2 wait in all_reduce #101"
STACKS = "/srv/run/diagnoses/20261203T092853Z-85ce13/attempt-0"


def diagnosed(**fields) -> dict:
    # As the bus has it: rank keys are ints (events.jsonl has them as strings).
    return {"event": "hang_diagnosed", "level": "error", "attempt": 0, "laggards": [1],
            "summary": SUMMARY, "stacks": STACKS, "unanswered": {}, "seconds": 0.013,
            "frames": {1: ["job.py:7 in spin_forever", "job.py:13 in <module>"]}, **fields}


def test_a_hang_is_one_line_then_the_diagnosis_with_the_laggards_frames_and_the_stack_files():
    lines = printed(hang(0, 95.5), hang(1, 94.5), hang(2, 94.0), diagnosed())
    assert lines == [
        "group hung: no rank showed progress within 90.0 s; rank 0 silent longest (95.5 s)",
        f"hang diagnosed: {SUMMARY}",
        "  rank 1 | job.py:7 in spin_forever",
        "  rank 1 | job.py:13 in <module>",
        f"  stacks: {STACKS}"]


def test_a_diagnosis_names_ranks_that_gave_no_stack_and_shows_a_few_ranks_frames_only():
    frames = {str(r): [f"job.py:{n} in f{n}" for n in range(8)] for r in range(6)}  # JSON's keys
    unanswered = {r: ["channel: no answer within 0.5 s", "py-spy: not installed"] for r in (3, 4, 5, 7)}
    lines = printed(hang(0, 3.0, before_first_step=True, timeout=None),
                    diagnosed(laggards=[], frames=frames, unanswered={**unanswered, 9: ["no channel"]},
                              stacks=None, stacks_error="not written within 2 s"))
    assert lines[0] == "group hung: no rank showed progress within the hang limit; rank 0 silent " \
                       "longest (3.0 s, none since its launch)"
    shown = [line for line in lines if " | " in line]
    assert len(shown) == 3 * 5 and shown[0] == "  rank 0 | job.py:0 in f0" and shown[-1].startswith("  rank 2 |")
    assert "  ... 3 more ranks in the stack files" in lines
    assert "  no stack from ranks 3-5, 7: channel: no answer within 0.5 s; py-spy: not installed" in lines
    assert "  no stack from rank 9: no channel" in lines
    assert lines[-1] == "  stacks: not written within 2 s"


def test_a_failure_diagnosis_a_rank_without_channel_and_a_learnt_limit_are_a_line_each():
    lines = printed(
        {"event": "channel_unavailable", "level": "info", "rank": 2, "restart": 0, "attempt": 0,
         "reason": "never imported torch.distributed", "judged_by": "output, steps and I/O"},
        {"event": "hang_timeout_learnt", "level": "info", "timeout": 90.0, "longest_interval": 0.0512,
         "samples": 10, "cap": 600.0},
        {"event": "failure_diagnosed", "level": "warning", "rank": 1, "attempt": 0, "laggards": [],
         "summary": "ranks 0, 2 wait in all_reduce #412", "stacks": STACKS, "seconds": 0.01,
         "frames": {0: ["job.py:9 in step"], 2: ["job.py:9 in step"]}, "unanswered": {}})
    assert lines == [
        "rank 2 has no channel: never imported torch.distributed; judged by output, steps and I/O",
        "hang limit now 90.0 s (longest interval 0.0512 s in 10 samples, at most 600.0 s)",
        f"survivors of rank 1: ranks 0, 2 wait in all_reduce #412  stacks: {STACKS}"]


def test_torchruns_warning_is_one_line_without_its_banner():
    assert printed({"event": "warning", "level": "warning", "message": envvars.OMP_WARNING}) == [
        "warning: Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to "
        "avoid your system being overloaded, please further tune the variable for optimal performance "
        "in your application as needed."]


def test_events_with_fields_missing_still_print_and_the_next_attempts_hang_is_said_again():
    lines = printed(hang(1, 94.5), {"event": "hang_diagnosed", "level": "error", "attempt": 0},
                    {"event": "launching", "level": "info", "attempt": 1, "restart": 1},
                    hang(0, 91.0, attempt=1))
    assert lines == ["group hung: no rank showed progress within 90.0 s; rank 1 silent longest (94.5 s)",
                     "hang diagnosed: no summary",
                     "group hung: no rank showed progress within 90.0 s; rank 0 silent longest (91.0 s)"]
