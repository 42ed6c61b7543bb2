"""What torch reads from the environment at import, honoured in a warm rank as in a cold one.

A cold rank's script can set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` before its first
``import torch`` and torch sizes its thread pool from them (``MKL_NUM_THREADS`` first, as
``at::init_num_threads`` does, and within MKL's own cap: the machine's cores); set after the
import, they change nothing. In a standby torch
was imported before the script ran, so :func:`watch` waits for the script's first import of
``torch`` (or a ``torch.*`` module), by ``import`` or ``importlib.import_module``, and at that
moment applies what a cold import would have read, then takes itself out of the import path.
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys

VARIABLES = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")


def watch() -> None:
    """Hook the imports of the script about to run (torch is already in ``sys.modules``)."""
    handed, torch = _read(), sys.modules["torch"]
    # A build with MKL takes no more threads than MKL's default, the cores: the count torch
    # took in this standby when its environment set neither variable.
    ceiling = (torch.get_num_threads() if handed == (None, None) else os.cpu_count() or 1) \
        if torch.backends.mkl.is_available() else None
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def first_torch_import(name: str) -> None:
        if name == "torch" or name.startswith("torch."):
            builtins.__import__, importlib.import_module = real_import, real_import_module
            if (now := _read()) != handed and (threads := _threads(now)) is not None:
                torch.set_num_threads(min(threads, ceiling or threads))

    def hooked_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            first_torch_import(name)
        return real_import(name, globals, locals, fromlist, level)

    def hooked_import_module(name, package=None):
        first_torch_import(name)
        return real_import_module(name, package)

    builtins.__import__, importlib.import_module = hooked_import, hooked_import_module


def _read() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in VARIABLES)


def _threads(values: tuple[str | None, ...]) -> int | None:
    """The first valid count, as the OpenMP and MKL runtimes parse it (``"4,2"``: 4); None
    where neither is valid (a cold import would then keep the default, which the standby has,
    unless its own environment set one: that case is left as it is)."""
    for value in values:
        try:
            count = int((value or "").split(",")[0])
        except ValueError:
            continue
        if count > 0:
            return count
    return None
