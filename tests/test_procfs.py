"""The /proc reader against real processes: fields, zombies, odd names, caught signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from supervisord_ft import procfs

# Prints once its handlers are installed, then waits for stdin to close.
HANDLER = ("import signal, sys; signal.signal(signal.SIGUSR1, lambda *a: None); "
           "print('ready', flush=True); sys.stdin.read()")


def test_stat_reads_parent_group_and_start_of_a_child():
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        st = procfs.stat(child.pid)
        assert st is not None
        assert (st.pid, st.ppid, st.pgid) == (child.pid, os.getpid(), child.pid)
        assert st.state in "RS" and procfs.alive(child.pid)
        # a clock tick of slack either side
        assert before - 0.02 <= st.start_ticks / procfs.CLK_TCK <= time.clock_gettime(time.CLOCK_BOOTTIME) + 0.02
        assert [c.pid for c in procfs.children(os.getpid())] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert procfs.stat(child.pid) is None and not procfs.alive(child.pid)


def test_an_exited_unreaped_child_is_a_zombie_and_not_alive():
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
    st = procfs.stat(child.pid)
    assert st is not None and st.zombie and not procfs.alive(child.pid)
    child.wait()


def test_a_name_with_parentheses_and_spaces_does_not_shift_the_fields(tmp_path):
    exe = tmp_path / "a) b (c"
    os.symlink("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        st = procfs.stat(child.pid)
        assert st is not None and st.ppid == os.getpid() and st.pgid == os.getpgid(0)
    finally:
        child.kill()
        child.wait()


def test_caught_signals_lists_only_installed_handlers():
    # SIGINT's default action first: a shell starting this suite in the background ignores it,
    # and Python installs its own SIGINT handler only where SIGINT is not ignored.
    child = subprocess.Popen([sys.executable, "-c", HANDLER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        caught = procfs.caught_signals(child.pid)
        assert caught is not None
        # Python itself catches SIGINT; SIGUSR2 keeps its default action (terminate)
        assert {signal.SIGUSR1, signal.SIGINT} <= caught and signal.SIGUSR2 not in caught
    finally:
        child.communicate(timeout=10)
    assert procfs.caught_signals(child.pid) is None
