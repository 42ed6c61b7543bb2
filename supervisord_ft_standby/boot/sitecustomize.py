"""Cold ranks' bootstrap: opens the per-rank channel (:mod:`supervisord_ft_standby.channel`) in a fresh interpreter.

The daemon starts a cold rank with this directory first on ``PYTHONPATH`` and the job's own
value, if it has one, in ``SUPERVISORD_FT_PYTHONPATH``. Python's ``site`` imports this module at start-up; it
puts ``sys.path`` and ``PYTHONPATH`` back as the job gave them (children see the job's value),
runs the job's own ``sitecustomize`` if it has one, installs the channel and arms the fast exit
of a failed rank (:mod:`supervisord_ft_standby.fastexit`). Nothing else of the rank changes; ``python -I`` or ``-E`` skip it (no channel: the rank is judged by output).
"""

import importlib
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_SAVED = "SUPERVISORD_FT_PYTHONPATH"  # unset: the job had no PYTHONPATH at all


def _restore() -> None:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    saved = os.environ.pop(_SAVED, None)
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


def _chain() -> None:
    """The job's own sitecustomize, found on the path as if ours had never been there; it then
    stands in ``sys.modules`` under that name, where ``site``'s import looks for it."""
    ours = sys.modules.pop(__name__)
    try:
        importlib.import_module("sitecustomize")
    except ModuleNotFoundError as exc:
        if exc.name != "sitecustomize":
            raise
    finally:
        sys.modules.setdefault(__name__, ours)


def _load(name: str):
    """Our module ``name`` (a sibling of this directory), loaded by path: our package is not on
    the job's ``sys.path``."""
    spec = importlib.util.spec_from_file_location(
        f"_supervisord_ft_{name}", os.path.join(os.path.dirname(_HERE), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _channel() -> None:
    path = os.environ.get("SUPERVISORD_FT_CHANNEL")
    if path:
        _load("channel").install(path)


_restore()
if os.environ.get("SUPERVISORD_FT_FAST_EXIT") == "1":
    _load("fastexit").arm()  # before the job's own sitecustomize, whose handlers then run first
_channel()
_chain()
