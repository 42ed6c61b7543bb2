"""The worker side: the script contract, and the built-in job run as real 2-rank gloo jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from supervisord_ft.checkpoints import TEMP_MARKER, checkpoint_path, discover
from supervisord_ft.errors import ConfigError
from supervisord_ft_worker.checkpoint import load_checkpoint
from supervisord_ft_worker.contract import SupervisorEnv, report_progress
from supervisord_ft_worker.train import parse_args

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60
# 20 global steps, checkpoints every 5; interval and retention do not change the weights.
JOB = ("--epochs", "2", "--steps", "10", "--checkpoint_interval", "5", "--seed", "7", "--hidden", "16")
WORKER = ("-m", "supervisord_ft_worker")



def e2e(test: Callable[..., Any]) -> Callable[..., Any]:
    """A run of the real worker. These share the module's loop, so the reference run is done once."""
    return pytest.mark.e2e(pytest.mark.asyncio(loop_scope="module")(test))


@dataclass(frozen=True)
class Exit:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def first(self, event: str) -> dict[str, Any]:
        return [e for e in self.events if e["event"] == event][0]

    def last(self, event: str) -> dict[str, Any]:
        return [e for e in self.events if e["event"] == event][-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def spawn(
    *args: str, world_size: int = 2, env: dict[str, str] | None = None, program: Sequence[str] = WORKER
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Start every rank of one job the way the supervisor does; no rank outlives the block."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISORD_FT_")}
    common = {
        **inherited,
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        **(env or {}),
    }
    procs: list[asyncio.subprocess.Process] = []
    try:
        for rank in range(world_size):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, *program, *args,
                    env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )
            )
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        async with asyncio.timeout(TIMEOUT_S):
            for proc in procs:
                await proc.wait()


async def next_event(proc: asyncio.subprocess.Process, event: str) -> dict[str, Any]:
    """Read stdout up to the first ``event`` line."""
    async with asyncio.timeout(TIMEOUT_S):
        while line := await proc.stdout.readline():
            parsed = json.loads(line)
            if parsed["event"] == event:
                return parsed
    raise AssertionError(f"stdout ended without a {event!r} event")


async def finish(proc: asyncio.subprocess.Process) -> Exit:
    """Wait for exit; every stdout line must be one JSON event."""
    async with asyncio.timeout(TIMEOUT_S):
        out, err = await proc.communicate()
    return Exit(proc.returncode, [json.loads(line) for line in out.decode().splitlines()], err.decode())


async def run_job(*args: str, world_size: int = 2, env: dict[str, str] | None = None) -> list[Exit]:
    async with spawn(*args, world_size=world_size, env=env) as procs:
        return list(await asyncio.gather(*(finish(p) for p in procs)))


def checkpoint_dir_env(directory: Path) -> dict[str, str]:
    return {"SUPERVISORD_FT_CHECKPOINT_DIR": str(directory)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted run keeping 2 checkpoints: its directory and final weights hash."""
    directory = tmp_path_factory.mktemp("reference")
    exits = await run_job(*JOB, "--keep_checkpoints", "2", env=checkpoint_dir_env(directory))
    assert [e.returncode for e in exits] == [0, 0], exits
    hashes = {e.last("training_done")["weights_sha256"] for e in exits}
    assert len(hashes) == 1, "ranks disagree on the final weights"
    return directory, hashes.pop()


# --- the contract ---------------------------------------------------------------------------


def test_env_is_read_into_a_frozen_dataclass() -> None:
    env = SupervisorEnv.from_env(
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "SUPERVISORD_FT_RESUME_FROM": "/c/x.pt"}
    )
    assert (env.rank, env.world_size, env.master_port, env.keep_checkpoints) == (1, 2, 29500, 3)
    assert env.resume_from == Path("/c/x.pt") and env.checkpoint_dir is None


def test_a_bad_env_value_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="SUPERVISORD_FT_KEEP_CHECKPOINTS"):
        SupervisorEnv.from_env({"SUPERVISORD_FT_KEEP_CHECKPOINTS": "0"})


def test_progress_is_one_flushed_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    report_progress(7, loss=0.5)
    assert capsys.readouterr().out.splitlines() == ['{"event":"step","step":7,"loss":0.5}']


def test_flags_accept_both_spellings() -> None:
    env = SupervisorEnv()
    assert parse_args(["--checkpoint-interval", "4"], env) == parse_args(["--checkpoint_interval", "4"], env)


async def test_first_sigterm_sets_the_stop_flag_second_kills() -> None:
    script = (
        "import time\n"
        "from supervisord_ft_worker.contract import StopFlag, emit\n"
        "flag = StopFlag().install()\n"
        "emit('ready')\n"
        "while not flag.requested:\n"
        "    time.sleep(0.01)\n"
        "emit('stop_requested')\n"
        "time.sleep(60)\n"
    )
    async with spawn(world_size=1, program=("-c", script)) as (proc,):
        await next_event(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        await next_event(proc, "stop_requested")
        proc.send_signal(signal.SIGTERM)
        assert (await finish(proc)).returncode == -signal.SIGTERM


# --- the built-in job -----------------------------------------------------------------------


async def resume_newest(directory: Path, reference: tuple[Path, str]) -> int:
    """Resume the job from the newest intact checkpoint in ``directory``; its weights must end
    bit-identical to the reference. Returns the first step the resumed group made."""
    newest = discover(directory).newest
    assert newest is not None
    resumed = await run_job(*JOB, "--resume_from_checkpoint", str(newest.path), env=checkpoint_dir_env(directory))
    assert [e.returncode for e in resumed] == [0, 0]
    assert resumed[0].last("training_done")["weights_sha256"] == reference[1]
    return resumed[0].first("step")["step"]


@e2e
async def test_a_survivor_saves_its_last_completed_step_so_a_crash_costs_no_step(
    tmp_path: Path, reference: tuple[Path, str]
) -> None:
    crashed = await run_job(*JOB, "--crash_at_step", "13", "--crash_rank", "1", env=checkpoint_dir_env(tmp_path))
    assert crashed[1].returncode == 1 and crashed[1].last("injected_crash")["step"] == 13
    assert crashed[0].returncode == 1  # its peer is gone mid-collective: it saves, then exits 1
    assert crashed[0].last("jit_checkpoint")["path"] == str(checkpoint_path(tmp_path, 13))
    assert await resume_newest(tmp_path, reference) == 14


@e2e
async def test_without_jit_checkpoints_a_crash_resumes_from_the_periodic_one(
    tmp_path: Path, reference: tuple[Path, str]
) -> None:
    crashed = await run_job(*JOB, "--crash_at_step", "13", "--crash_rank", "1", "--no-jit-checkpoint",
                            env=checkpoint_dir_env(tmp_path))
    assert [e.returncode for e in crashed] == [1, 1]
    assert await resume_newest(tmp_path, reference) == 11


@e2e
async def test_a_failed_jit_save_falls_back_to_the_newest_periodic_checkpoint(
    tmp_path: Path, reference: tuple[Path, str]
) -> None:
    # rank 0's disk is full from step 12 on (after the periodic save of step 10): its save of 13 fails
    crashed = await run_job(*JOB, "--crash_at_step", "13", "--crash_rank", "1", "--disk_full_at_step", "12",
                            env=checkpoint_dir_env(tmp_path))
    assert crashed[0].returncode == 1 and "too large" in crashed[0].last("jit_checkpoint_failed")["error"]
    assert not any(TEMP_MARKER in p.name for p in tmp_path.iterdir())
    assert await resume_newest(tmp_path, reference) == 11


@e2e
async def test_the_writer_killed_with_a_periodic_save_in_flight_costs_no_step(
    tmp_path: Path, reference: tuple[Path, str]
) -> None:
    # rank 0 starts the background save of step 10, then dies at once; rank 1 saves step 10 itself
    crashed = await run_job(*JOB, "--crash_at_step", "10", "--crash_rank", "0", env=checkpoint_dir_env(tmp_path))
    assert [e.returncode for e in crashed] == [1, 1]
    assert crashed[1].last("jit_checkpoint")["path"] == str(checkpoint_path(tmp_path, 10))
    assert await resume_newest(tmp_path, reference) == 11


@e2e
async def test_survivors_saving_one_step_at_once_leave_one_intact_file(tmp_path: Path) -> None:
    crashed = await run_job(*JOB, "--crash_at_step", "13", "--crash_rank", "1", world_size=3,
                            env=checkpoint_dir_env(tmp_path))
    assert [e.returncode for e in crashed] == [1, 1, 1]
    survivors = (crashed[0], crashed[2])
    # each saves the step it last completed (13 here; with more ranks one may be a step behind)
    assert {e.last("jit_checkpoint")["path"] for e in survivors} == {str(checkpoint_path(tmp_path, 13))}
    assert not any(TEMP_MARKER in p.name for p in tmp_path.iterdir())
    state = load_checkpoint(discover(tmp_path).newest.path)
    assert (state["global_step"], state["world_size"]) == (13, 3)


@e2e
async def test_sigterm_stops_all_ranks_at_one_checkpointed_step_and_resume_matches(
    tmp_path: Path, reference: tuple[Path, str]
) -> None:
    async with spawn(*JOB, "--step_time", "0.1", env=checkpoint_dir_env(tmp_path)) as procs:
        for proc in procs:
            await next_event(proc, "step")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        stopped = await asyncio.gather(*(finish(p) for p in procs))
    assert [e.returncode for e in stopped] == [0, 0]
    stop_steps = {e.last("stopped")["step"] for e in stopped}
    assert len(stop_steps) == 1
    stop_step = stop_steps.pop()
    assert stop_step < 20 and checkpoint_path(tmp_path, stop_step).is_file()

    env = {**checkpoint_dir_env(tmp_path), "SUPERVISORD_FT_RESUME_FROM": str(checkpoint_path(tmp_path, stop_step))}
    resumed = await run_job(*JOB, env=env)
    assert [e.returncode for e in resumed] == [0, 0]
    assert resumed[1].first("step")["step"] == stop_step + 1
    assert resumed[1].last("training_done")["weights_sha256"] == reference[1]


@e2e
async def test_corrupt_resume_file_is_refused_with_exit_2_and_one_line(
    tmp_path: Path, reference: tuple[Path, str]
) -> None:
    intact = checkpoint_path(reference[0], 20).read_bytes()
    truncated = tmp_path / "checkpoint_step_20.pt"
    truncated.write_bytes(intact[: len(intact) // 2])
    exits = await run_job(*JOB, "--resume_from_checkpoint", str(truncated), env=checkpoint_dir_env(tmp_path))
    for e in exits:
        assert e.returncode == 2 and e.events == []
        assert len(e.stderr.splitlines()) == 1 and str(truncated) in e.stderr


@e2e
async def test_checkpoint_from_another_world_size_is_refused(tmp_path: Path, reference: tuple[Path, str]) -> None:
    resume = str(checkpoint_path(reference[0], 20))
    (exit_,) = await run_job(*JOB, "--resume_from_checkpoint", resume, world_size=1, env=checkpoint_dir_env(tmp_path))
    assert exit_.returncode == 2 and "written by 2 ranks" in exit_.stderr


@e2e
async def test_only_the_newest_checkpoints_are_kept(reference: tuple[Path, str]) -> None:
    directory, _ = reference
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint_step_15.pt", "checkpoint_step_20.pt"]
    assert not any(TEMP_MARKER in p.name for p in directory.iterdir())


@e2e
async def test_a_checkpoint_is_one_ranks_state_with_a_torch_optim_state_and_no_rng_streams(
    reference: tuple[Path, str]
) -> None:
    state = load_checkpoint(checkpoint_path(reference[0], 20))
    assert (state["global_step"], state["world_size"], state["steps_per_epoch"]) == (20, 2, 10)
    assert "rng_states" not in state  # randomness comes from (seed, step, rank)
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9
    momentum = state["optimizer"]["state"]
    assert len(momentum) == 6 and all(set(s) == {"momentum_buffer"} for s in momentum.values())
