"""A rank that failed leaves as soon as the job's own exit handlers have run.

After an uncaught exception CPython runs the ``atexit`` handlers, then tears the interpreter down:
every module's objects freed, torch's and gloo's destructors run. For a torch rank that is
0.4-0.6 s of CPU on 2 cores (a Lightning rank's more), all of it between the failure and the
moment the daemon sees the rank exit, on the recovery's critical path, and none of it the job's:
the peers that the recovery stops get SIGTERM and no teardown at all. So a rank that raised an
uncaught exception (its status is 1 already), once every handler of the job's has run, flushes
every Python file still open (the standard streams last) and leaves with ``os._exit(1)``. Not
after a ``SystemExit``: a cold rank cannot see its code, and a warm rank must end as a cold one.

Armed by :func:`arm` only when no ``atexit`` handler was registered before (``atexit`` runs them
last-in first-out, so this one then runs after all of the job's), and acting only when the
daemon set :data:`ENV` (``fast_failed_exit``; read at exit, so a standby armed before it knew its
rank obeys the rank's environment). ``KeyboardInterrupt`` and a clean exit take Python's own way.
Self-contained: the cold bootstrap loads it by path.
"""

from __future__ import annotations

import _io
import atexit
import gc
import os
import sys

ENV = "SUPERVISORD_FT_FAST_EXIT"
_failed = False  # a warm runner saw its script raise


def arm() -> None:
    """Register the exit handler if it will run last; call before anything else registers one."""
    if atexit._ncallbacks() == 0:
        atexit.register(_leave)


def failed() -> None:
    """The warm runner's word: the script raised, the traceback is printed, the status is 1."""
    global _failed
    _failed = True


def _leave() -> None:
    if (_failed or _uncaught()) and os.environ.get(ENV) == "1":
        _flush_files()
        os._exit(1)


def _uncaught() -> bool:
    """Whether the interpreter printed an exception that escaped the main module: ``PyErr_Print``
    (the only setter in a script) leaves it in ``sys.last_value``, its outermost frame the main
    module's (``python script.py``, ``-c``) or ``runpy``'s (``-m``, a zipapp, a directory)."""
    value, tb = getattr(sys, "last_value", None), getattr(sys, "last_traceback", None)
    if tb is None or isinstance(value, KeyboardInterrupt):
        return False
    return tb.tb_frame.f_globals.get("__name__") in ("__main__", "runpy")


def _flush_files() -> None:
    """Flush every open Python file object, found by the C base class (an ``io.IOBase`` check
    would run ABC code, and other objects' hooks), so no line or record the job wrote is lost."""
    for obj in gc.get_objects():
        if issubclass(type(obj), _io._IOBase):  # type(): an object's __class__ may be a property
            _flush(obj)
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)


def _flush(f: object) -> None:
    try:
        f.flush()  # type: ignore[attr-defined]
    except Exception:  # closed, a broken pipe, a full disk: the teardown would have lost it too
        pass
