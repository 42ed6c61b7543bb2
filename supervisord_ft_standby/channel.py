"""The per-rank channel: torch's worker server on a Unix socket inside the rank.

The daemon asks a rank through it for its flight-recorder trace (the collectives each process
group enqueued and retired) and for every thread's Python stack; both are answered by a C++
thread of torch's, so a rank that spins holding the GIL or waits in a collective still answers.
The daemon names the socket in ``SUPERVISORD_FT_CHANNEL``; :func:`install` opens it as soon as
``torch.distributed`` is imported (at once if it already is, as in a warm standby), so a script
that never imports it, or a rank that is not Python, simply has no channel.

It also answers :data:`MODULES` (the modules the rank imported from installed packages, in import
order), from which the daemon learns what the next standbys should import.

A user's own ``_WorkerServer`` (another path) and a ``TORCH_FR_BUFFER_SIZE`` of their own keep
working: this module only opens one more socket, and the daemon only sets the variable when it
is unset. Self-contained (the cold bootstrap loads it by path, without our packages on sys.path).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import sysconfig
from typing import Any

CHANNEL = "SUPERVISORD_FT_CHANNEL"
MODULES = "sft_modules"  # the handler's name; the daemon's supervisord_ft.channel.MODULES
_NEVER = {"__main__", "__mp_main__", "sitecustomize", "usercustomize"}  # not the job's to replay
_TRIGGER = "torch.distributed"
_server: Any = None


def install(path: str) -> None:
    """Open the channel at ``path`` once ``torch.distributed`` is importable; never raises."""
    if _TRIGGER in sys.modules:
        _open(path)
    else:
        sys.meta_path.insert(0, _AfterImport(path))


def _open(path: str) -> None:
    global _server
    if _server is not None:
        return
    try:
        from torch._C._distributed_c10d import _WorkerServer
    except Exception:  # a torch without it (or a broken one): judged by output, as today
        return
    # The server logs "listening" to stderr from its constructor and three lines from its
    # destructor: the job's stderr is the user's, so the first is sent to /dev/null (for the
    # microseconds the constructor takes) and the object is kept alive past the interpreter's
    # end (the socket file is the daemon's to remove).
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        _server = _WorkerServer(path)
    except Exception:  # a path in use or too long: the daemon sees no socket and says so
        return
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    import ctypes
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_server))
    try:
        from torch._C._distributed_c10d import _register_handler
        _register_handler(MODULES, _modules)
    except Exception:  # an older torch: nothing is learnt, the standbys import `preload` only
        pass


def _modules(_request: Any, response: Any) -> None:
    """The names of the modules imported from the standard library and installed packages, in
    the order they were imported; never the job's own code (it may change between attempts)."""
    roots = tuple({os.path.join(sysconfig.get_path(k), "")
                   for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    names = [name for name, module in list(sys.modules.items())
             if isinstance(getattr(module, "__file__", None), str)
             and module.__file__.startswith(roots) and name not in _NEVER
             and not name.lstrip("_").startswith("supervisord_ft")]
    response.set_content(json.dumps(names), "application/json")
    response.set_status(200)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_open` right after ``torch.distributed`` has been executed, then steps aside."""

    def __init__(self, path: str) -> None:
        self.path = path

    def find_spec(self, name: str, import_path: Any, target: Any = None) -> Any:
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_open(module: Any) -> None:
            exec_module(module)
            _open(self.path)

        spec.loader.exec_module = exec_then_open  # type: ignore[method-assign]
        return spec
