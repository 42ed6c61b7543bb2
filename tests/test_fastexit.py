"""A failed rank's fast exit (supervisord_ft_standby/fastexit.py), through the cold bootstrap as
the daemon starts a rank: what it keeps (the job's atexit handlers, its unclosed files' data, the
status), what it skips (the interpreter's teardown), and when it stands aside.
The warm path is tested with the probe in test_standby.py; a whole recovery with torch in
test_frameworks.py and the frameworks bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from supervisord_ft import channel, envvars

SCRIPT = """
import atexit, os, sys
class Teardown:
    def __del__(self, write=os.write):
        write(2, b"teardown\\n")
teardown = Teardown()
log = open(sys.argv[1], "w")  # never closed: its buffer is written only by a flush
log.write("written before the failure\\n")
atexit.register(os.write, 2, b"atexit\\n")
{end}
"""


def run(tmp_path: Path, end: str, *, fast: bool = True,
        python: Path = Path(sys.executable)) -> tuple[int, list[str], str]:
    """Run the script as a cold rank: its status, its stderr's last lines, its unclosed file."""
    (tmp_path / "job.py").write_text(SCRIPT.format(end=end))
    env = {k: v for k, v in os.environ.items() if k != envvars.FAST_EXIT}
    if fast:
        env[envvars.FAST_EXIT] = "1"
    out = subprocess.run([str(python), str(tmp_path / "job.py"), str(tmp_path / "log")],
                         env=channel.cold_env(env), capture_output=True, text=True, timeout=60)
    return out.returncode, out.stderr.splitlines()[-2:], (tmp_path / "log").read_text()


def test_an_uncaught_exception_leaves_after_the_jobs_atexit_handlers_with_its_files_flushed(tmp_path):
    assert run(tmp_path, "raise ValueError('bad batch')") == (
        1, ["ValueError: bad batch", "atexit"], "written before the failure\n")


@pytest.mark.parametrize("end,status", [("pass", 0), ("sys.exit(3)", 3), ("raise KeyboardInterrupt", -signal.SIGINT)])
def test_a_clean_exit_a_system_exit_and_an_interrupt_take_pythons_own_way(tmp_path, end, status):
    code, last, log = run(tmp_path, end)
    assert (code, last[-1], log) == (status, "teardown", "written before the failure\n")


def test_off_a_failed_rank_exits_as_python_does(tmp_path):
    assert run(tmp_path, "raise ValueError('bad batch')", fast=False)[:2] == (1, ["atexit", "teardown"])


def test_a_handler_registered_before_the_bootstrap_would_run_after_it_so_it_stands_aside(tmp_path):
    """A ``.pth`` file's handler (as coverage's process start-up registers) is in before ours."""
    venv.create(tmp_path / "env")
    site = next((tmp_path / "env" / "lib").glob("python3*/site-packages"))
    (site / "early.pth").write_text("import atexit; atexit.register(lambda: None)\n")
    python = tmp_path / "env" / "bin" / "python"
    assert run(tmp_path, "raise ValueError('bad batch')", python=python)[:2] == (1, ["atexit", "teardown"])
