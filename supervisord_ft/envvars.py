"""The environment every rank is started with: torchrun's variables and our own, each named once.

The daemon writes them (:func:`for_rank`); ``supervisord_ft_worker.contract`` and the test fake read them by
these names. Torch-free, so any of them may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: a torch-free worker that reads the names stays a bare interpreter
    from .rendezvous import Endpoint, RankInfo

# torchrun's names and meanings
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
GROUP_RANK = "GROUP_RANK"  # the node's rank in the round
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"  # nodes in the round
ROLE_RANK = "ROLE_RANK"  # one role ("default"): the same as RANK
ROLE_NAME = "ROLE_NAME"
ROLE_WORLD_SIZE = "ROLE_WORLD_SIZE"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
TORCHELASTIC_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
TORCHELASTIC_MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
# Multi-node: the job's rdzv_id, as torchrun. One node: the daemon's run_id, as `torchrun
# --standalone` gives each invocation a fresh rdzv id.
TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
# Where ``torch.distributed.elastic.multiprocessing.errors.record`` writes the rank's exception
# (JSON: type, message, traceback, timestamp), one file per rank and attempt, as torchrun's agent.
TORCHELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
# torchrun's default: the signals its agent stops on and passes to the ranks (a rank's own
# torch.distributed.elastic launches read it). The daemon's stop signals are the same four.
SIGNALS_TO_HANDLE = "TORCHELASTIC_SIGNALS_TO_HANDLE"
STOP_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
# NCCL's watchdog aborts a failed communicator (the rank then exits, and the group is relaunched)
# rather than leaving its peers blocked: torchrun's "1" unless the launcher's environment says.
NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
# One OpenMP thread per rank when several share a node and nothing says otherwise, as torchrun
# (read at torch's import, so the standbys are started with it: not PER_RANK).
OMP_NUM_THREADS = "OMP_NUM_THREADS"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"  # set only with virtual_local_rank, as torchrun
OMP_WARNING = ("\n*****************************************\n"
               "Setting OMP_NUM_THREADS environment variable for each process to be "
               "1 in default, to avoid your system being overloaded, "
               "please further tune the variable for optimal performance in "
               "your application as needed. \n"
               "*****************************************")  # torchrun's text, word for word
# ours
RUN_ID = "SUPERVISORD_FT_RUN_ID"  # the daemon invocation's run_id, as on every event it logs
RESTART_COUNT = "SUPERVISORD_FT_RESTART_COUNT"
CHECKPOINT_DIR = "SUPERVISORD_FT_CHECKPOINT_DIR"
RESUME_FROM = "SUPERVISORD_FT_RESUME_FROM"  # unset on a fresh start
KEEP_CHECKPOINTS = "SUPERVISORD_FT_KEEP_CHECKPOINTS"
CHANNEL = "SUPERVISORD_FT_CHANNEL"  # the rank's channel socket (supervisord_ft.channel); unset: none
FAST_EXIT = "SUPERVISORD_FT_FAST_EXIT"  # "1": a failed rank skips the interpreter's teardown
UNBUFFERED = "PYTHONUNBUFFERED"  # a Python worker's lines reach the daemon as they are printed
# torch's: the ranks are clients of a store the launcher hosts (set to exactly "True"), as
# torchrun's agent does; unset when rank 0 hosts it.
USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"

ROLE = "default"  # torchrun's role name when none is given

ALL = (RANK, LOCAL_RANK, GROUP_RANK, GROUP_WORLD_SIZE, ROLE_RANK, ROLE_NAME, ROLE_WORLD_SIZE,
       WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
       TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS, TORCHELASTIC_RUN_ID,
       TORCHELASTIC_ERROR_FILE, SIGNALS_TO_HANDLE, NCCL_ASYNC_ERROR_HANDLING, OMP_NUM_THREADS, RUN_ID,
       RESTART_COUNT, CHECKPOINT_DIR, RESUME_FROM, KEEP_CHECKPOINTS, UNBUFFERED, USE_AGENT_STORE, CHANNEL,
       FAST_EXIT)
# The ones that differ between ranks or attempts (or runs). The rest, read at interpreter start
# or torch's import, are the same for every rank of every attempt.
PER_RANK = tuple(v for v in ALL if v not in (UNBUFFERED, SIGNALS_TO_HANDLE, NCCL_ASYNC_ERROR_HANDLING,
                                             OMP_NUM_THREADS))


def sets_omp_threads(base: Mapping[str, str], local_world_size: int) -> bool:
    """Whether :func:`for_rank` sets OMP_NUM_THREADS=1 (torchrun's rule); the daemon says so once."""
    return OMP_NUM_THREADS not in base and local_world_size > 1


def for_rank(base: Mapping[str, str], rank: RankInfo, endpoint: Endpoint, *, run_id: str,
             restart: int, max_restarts: int, checkpoint_dir: Path, keep_checkpoints: int,
             resume_from: Path | None, rdzv_id: str | None = None,
             channel: str | None = None, error_file: Path | None = None,
             role: str = ROLE, virtual_local_rank: bool = False,
             fast_exit: bool = False) -> dict[str, str]:
    """``base`` with every variable above set for ``rank`` (and a stale RESUME_FROM removed).

    ``virtual_local_rank`` (torchrun's ``--virtual-local-rank``): LOCAL_RANK is 0 for every
    rank, and CUDA_VISIBLE_DEVICES names the rank's own device alone: the local rank's entry of
    ``base``'s list (checked by :func:`config.build`), else the local rank. Such a rank runs warm
    only where it matches the standbys' (which took the first launch's rank 0's)."""
    env = dict(base)
    env.update({
        RANK: str(rank.rank), LOCAL_RANK: str(rank.local_rank), GROUP_RANK: str(rank.node_rank),
        GROUP_WORLD_SIZE: str(rank.nnodes), ROLE_RANK: str(rank.rank), ROLE_NAME: role,
        ROLE_WORLD_SIZE: str(rank.world_size), WORLD_SIZE: str(rank.world_size),
        LOCAL_WORLD_SIZE: str(rank.local_world_size),
        MASTER_ADDR: endpoint.addr, MASTER_PORT: str(endpoint.port),
        TORCHELASTIC_RESTART_COUNT: str(restart), TORCHELASTIC_MAX_RESTARTS: str(max_restarts),
        TORCHELASTIC_RUN_ID: rdzv_id or run_id, RUN_ID: run_id,
        RESTART_COUNT: str(restart), CHECKPOINT_DIR: str(checkpoint_dir.resolve()),
        KEEP_CHECKPOINTS: str(keep_checkpoints), UNBUFFERED: "1", SIGNALS_TO_HANDLE: STOP_SIGNALS,
    })
    if virtual_local_rank:
        visible = base.get(CUDA_VISIBLE_DEVICES)
        env[LOCAL_RANK] = "0"
        env[CUDA_VISIBLE_DEVICES] = (visible.split(",")[rank.local_rank].strip() if visible is not None
                                     else str(rank.local_rank))
    env.setdefault(NCCL_ASYNC_ERROR_HANDLING, "1")
    if sets_omp_threads(base, rank.local_world_size):
        env[OMP_NUM_THREADS] = "1"
    env.pop(RESUME_FROM, None)
    if resume_from is not None:
        env[RESUME_FROM] = str(resume_from.resolve())
    env.pop(USE_AGENT_STORE, None)
    if endpoint.agent_store:
        env[USE_AGENT_STORE] = "True"
    for name, value in ((CHANNEL, channel), (TORCHELASTIC_ERROR_FILE, error_file),
                        (FAST_EXIT, "1" if fast_exit else None)):
        env.pop(name, None)
        if value is not None:
            env[name] = str(value)
    return env
