"""torchrun's command line: ``supervisord-ft run [torchrun's options] script.py [args]``.

A torchrun command line means here what it means to torchrun 2.13 (``torch/distributed/run.py``):
the script and everything after it are the job's command, ``-m`` runs a module, ``--no-python``
runs the script itself, ``--nproc-per-node`` takes ``auto``/``cpu``/``gpu``. The options that are
the same setting as one of ours are aliases in :data:`config.OPTIONS`; those that have no meaning
here are in :data:`IGNORED`, accepted and said once at start-up. ``torchrun-ft`` is the same
command with torchrun's name and defaults, so a job script changes one word.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError

# torchrun's defaults where ours differ: one rank, no restart, 30 s from SIGTERM to SIGKILL.
# Only `torchrun-ft` takes them.
DEFAULTS = {"num_workers": 1, "max_restarts": 0, "grace_period": 30.0}
NPROC_WORDS = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Ignored:
    """A torchrun option with nothing to do here: why, said in ``torchrun_option_ignored``."""
    flags: tuple[str, ...]
    why: str
    takes_value: bool = True


IGNORED: tuple[Ignored, ...] = (
    Ignored(("--monitor-interval", "--monitor_interval"),
            "rank exits are awaited as they happen, nothing polls"),
    Ignored(("--start-method", "--start_method"),
            "a script always runs in a process of its own (torchrun too ignores it for a script)"),
    Ignored(("--event-log-handler", "--event_log_handler"), "events go to events.jsonl"),
    Ignored(("--logs-specs", "--logs_specs"), "torchrun's logging plugins do not apply"),
    Ignored(("--numa-binding", "--numa_binding"), "no NUMA binding here"),
    Ignored(("--duplicate-stdout-filters", "--duplicate_stdout_filters"),
            "every line is in events.jsonl: filter it with jq"),
    Ignored(("--duplicate-stderr-filters", "--duplicate_stderr_filters"),
            "every line is in events.jsonl: filter it with jq"),
    Ignored(("--signals-to-handle", "--signals_to_handle"),
            "SIGTERM, SIGINT, SIGHUP and SIGQUIT stop the run gracefully and SIGUSR1 and SIGUSR2 go "
            "on to the ranks that handle them, whatever is given (docs/reference.md, Signals)"),
    Ignored(("--node-rank", "--node_rank"),
            "a node's rank is given by the c10d rendezvous (no static multi-node rendezvous here)"),
)


def command(script_args: Sequence[str], *, module: bool, no_python: bool,
            run_path: bool) -> list[str]:
    """The job's argv for torchrun's ``script [args]`` and its -m/--no-python/--run-path.

    Python is :func:`job_python`. torchrun passes ``-u``; the
    ranks get ``PYTHONUNBUFFERED=1`` instead (the same, and for a script's own children too).
    ``--run-path`` runs the script in a fresh interpreter as a plain ``python script.py`` does
    (torchrun: ``runpy.run_path`` in a spawned one) and wins over ``-m`` and ``--no-python``, as
    torchrun's.
    """
    script, *args = script_args
    python = job_python()
    if run_path:
        return [python, script, *args]
    if not no_python:
        return [python, *(["-m"] if module else []), script, *args]
    if module:
        raise ConfigError("module: don't use both --no-python and -m/--module (as torchrun)")
    return [script, *args]


def job_python() -> str:
    """``$PYTHON_EXEC``, as torchrun's; else this interpreter if torch is installed for it (the
    daemon in the training environment, torchrun's case); else the ``python3`` on ``PATH``: the
    daemon installed apart (pipx, a venv of its own) runs the job with the environment's."""
    if python := os.environ.get("PYTHON_EXEC"):
        return python
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return shutil.which("python3") or shutil.which("python") or sys.executable


def local_world_size(word: str) -> int:
    """``--nproc-per-node auto|cpu|gpu`` as torchrun counts, without importing torch: ``gpu``
    counts NVIDIA's devices (``CUDA_VISIBLE_DEVICES`` when set, else the driver's list), ``auto``
    is that count, or the CPUs when there is no GPU."""
    cpus = len(os.sched_getaffinity(0))
    if word == "cpu":
        return cpus
    gpus = _gpu_count()
    if word == "gpu" and not gpus:
        raise ConfigError("num_workers: gpu: no GPU found (CUDA_VISIBLE_DEVICES is empty or "
                          "/proc/driver/nvidia/gpus lists none)")
    return gpus or cpus


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # as CUDA reads it: the list ends at the first invalid entry
        count = 0
        for device in visible.split(","):
            if not device.strip() or device.strip().startswith("-"):
                break
            count += 1
        return count
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def why_ignored(flag: str) -> str:
    return next(opt.why for opt in IGNORED if opt.flags[0] == flag)
