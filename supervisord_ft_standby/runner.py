"""A warm standby rank: import what the job needs, wait for a rank, then become that rank's script.

Started by the daemon (``supervisord_ft.standby``) as ``python -m supervisord_ft_standby REPLY_FD MODULE...``
with the environment every rank shares, in its own session, with the parent-death signal, and
with stdout and stderr already the pipes that become the rank's output. It imports the
``MODULE`` list, then the modules the daemon learnt from the job's ranks (the first line on its
stdin, ``{"learnt": [...]}``, imported from installed locations only: the job's own code is never
among them), says ``ready`` on ``REPLY_FD`` with what it imported and blocks reading its stdin
(costing no CPU).
The daemon then writes one order, ``{"argv": [...], "env": {...}, "cwd": "...", "nice": N}``, and the
standby makes itself what ``argv`` would have started: the order's environment and working
directory, ``sys.argv``/``sys.orig_argv``/``sys.path[0]`` as the interpreter sets them, the
original ``__main__`` module emptied and reused, stdin on /dev/null, no descriptor but 0, 1 and 2
left open, and then runs the script (``python script.py``, or its ``.pyc``), the module
(``python -m mod``, through the same ``runpy`` function the interpreter calls), or the
``__main__`` module of a directory or zip archive (``python app.pyz``: a zipapp or a pex, run as
the interpreter does). ``SystemExit`` ends the process as it would a cold one; an uncaught
exception prints through ``sys.excepthook`` with the standby's own frames removed and exits 1
(``KeyboardInterrupt``: by SIGINT, after the ``atexit`` handlers); the exception's exit skips the
interpreter's teardown, as a cold rank's does (:mod:`.fastexit`).

What a script can still tell: the modules already in ``sys.modules``, ``/proc/self/cmdline``,
the process start time, and any environment variable read at interpreter start or import time
(those are the shared environment, which the daemon only hands over unchanged; see docs/recovery.md).
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import io
import marshal
import os
import runpy
import signal
import sys
import time
import types
import zipfile
from importlib.machinery import SourceFileLoader, SourcelessFileLoader
from importlib.util import MAGIC_NUMBER
from typing import Any

from . import channel, fastexit, lines, threads

_OWN_FRAMES = {__file__, threads.__file__}
# When this standby was handed its rank (wall clock): a start-up report's zero (supervisord_ft_worker/startup.py).
ACTIVATED_AT: float | None = None


def main() -> None:
    fastexit.arm()  # first: the job's own atexit handlers, registered later, run before it
    reply_fd, preload = int(sys.argv[1]), sys.argv[2:]
    orders = lines.Reader(0)
    failed = {}
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported; the script will meet the same error when it imports it
            failed[name] = f"{type(exc).__name__}: {exc}"
    learnt = orders.read()
    if learnt is None:  # the daemon let this standby go (or died)
        os._exit(0)
    skipped = _import_learnt(learnt["learnt"])
    lines.write(reply_fd, event="ready", failed=failed, skipped=skipped, modules=list(sys.modules))
    order = orders.read()
    if order is None:  # the daemon let this standby go (or died): nothing ran, nothing to say
        os._exit(0)
    try:
        os.chdir(order["cwd"])
        if order.get("nice") is not None:
            _schedule_as_a_rank(order["nice"])
    except OSError as exc:  # a cold start would fail to spawn: let the daemon do that itself
        lines.write(reply_fd, event="refused", reason=f"{exc.filename or 'priority'}: {exc}")
        os._exit(0)
    os.environ.clear()
    os.environ.update(order["env"])
    if path := os.environ.get(channel.CHANNEL):
        channel.install(path)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    global ACTIVATED_AT
    ACTIVATED_AT = time.time()
    lines.write(reply_fd, event="running", pid=os.getpid())
    os.close(reply_fd)
    if "torch" in sys.modules:
        threads.watch()
    try:
        _run(order["argv"])
    except SystemExit:
        raise
    except BaseException as exc:
        _uncaught(exc)


def _schedule_as_a_rank(nice: int) -> None:
    """Leave SCHED_IDLE, the standby's, for the scheduling a cold rank gets: every thread
    (torch's import may have started some), at the daemon's ``nice``."""
    for tid in map(int, os.listdir("/proc/self/task")):
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def _import_learnt(names: list[str]) -> list[str]:
    """Import ``names`` as the job's ranks did, in their order; those that fail are returned.
    This package's own directory (``sys.path[0]`` here) is off the path meanwhile: a name must
    find the installed module the ranks had, never a folder of ours of the same name."""
    ours = sys.path.pop(0)
    skipped = []
    try:
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:  # an import that needs what only a rank has: it will do it then
                skipped.append(name)
    finally:
        sys.path.insert(0, ours)
    return skipped


def _run(argv: list[str]) -> None:
    sys.orig_argv = list(argv)
    globals_ = vars(sys.modules["__main__"])
    globals_.clear()
    globals_.update(__name__="__main__", __doc__=None, __package__=None, __loader__=None,
                    __spec__=None, __annotations__={}, __builtins__=builtins)
    if argv[1] == "-m":
        sys.argv = ["-m", *argv[3:]]
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(argv[2])  # what `python -m` calls: the same frames, the same errors
        return
    script = argv[1]
    sys.argv = argv[1:]
    path = os.path.abspath(script)
    if os.path.isdir(path) or zipfile.is_zipfile(path):
        # The interpreter puts such a path first on sys.path and runs its __main__ module (a
        # zipapp's bytes read as source are a SyntaxError: the relaunch failed, warm only).
        sys.path[0] = path
        runpy._run_module_as_main("__main__", alter_argv=False)
        return
    try:
        with io.open_code(path) as fh:
            source = fh.read()
    except OSError as exc:
        print(f"{argv[0]}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}",
              file=sys.stderr)
        raise SystemExit(2) from None
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    if source[:4] == MAGIC_NUMBER:  # python script.pyc: the compiled code after the 16-byte header
        code, loader = marshal.loads(source[16:]), SourcelessFileLoader("__main__", path)
    else:
        code, loader = compile(source, path, "exec", dont_inherit=True), SourceFileLoader("__main__", path)
    globals_.update(__file__=path, __cached__=None, __loader__=loader)
    exec(code, globals_)


def _uncaught(exc: BaseException) -> Any:
    tb = _without_own_frames(exc.__traceback__)
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)
    if not isinstance(exc, KeyboardInterrupt):
        fastexit.failed()
        raise SystemExit(1)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def _without_own_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback a cold rank would print: this module's frames (above the script) and the
    import hook's (within it, see :mod:`.threads`) left out (a loop: a RecursionError's is deep)."""
    kept = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename not in _OWN_FRAMES:
            kept.append(tb)
        tb = tb.tb_next
    rest = None
    for tb in reversed(kept):
        rest = types.TracebackType(rest, tb.tb_frame, tb.tb_lasti, tb.tb_lineno)
    return rest
