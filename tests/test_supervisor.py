"""The real daemon supervising the torch-free fake worker: recovery, limits, signals, output."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from harness import FAKE_WORKER, ROOT, matching, pid_alive, read_events
from supervisord_ft import checkpoints, envvars

JOBS = ROOT / "tests" / "jobs"

LONG = ["--steps", "2000", "--step-time", "0.01"]  # runs ~20 s unless stopped


async def test_crash_tears_down_survivors_and_relaunches_the_group(daemon):
    d = await daemon("--num-workers", "3", "--grace-period", "5", "--jit-checkpoint-timeout", "0",
                     command=[*FAKE_WORKER, "--steps", "20", "--step-time", "0.02",
                              "--fail-rank", "1", "--fail-at-step", "3", "--fail-code", "7"])
    assert await d.finish() == 0
    assert d.states() == ["LAUNCHING", "RUNNING", "RECOVERING", "LAUNCHING", "RUNNING", "DONE"]
    failed = d.named("worker_exited", rank=1, restart=0)[0]
    assert failed["returncode"] == 7
    # the survivors were stopped by the supervisor (SIGTERM), not left to finish their 20 steps
    teardown = d.named("teardown", why="recovery")[0]
    assert sorted(teardown["terminated"]) == [0, 2]
    # (a survivor that started late may have printed no step at all before it was stopped)
    assert all(max((e["worker_step"] for e in d.named("worker_output", rank=r, restart=0)
                    if e.get("worker_event") == "step"), default=0) < 20 for r in (0, 2))
    assert len(set(d.worker_pids())) == 6
    assert len(d.named("worker_exited", restart=1, returncode=0)) == 3
    exit_event = d.events[-1]
    assert exit_event == {**exit_event, "event": "supervisor_exit", "state": "DONE",
                          "restarts": 1, "exit_code": 0}


# Steps of 0.1 s: the survivors' jit_checkpoint_armed lines reach the daemon before rank 1 fails
# (a real job arms at its first collective, long before any failure).
SURVIVORS_SAVE = [*FAKE_WORKER, "--steps", "5", "--step-time", "0.1", "--fail-rank", "1", "--fail-at-step", "2",
                  "--survivor-save", "2", "--arm-jit"]


async def test_survivors_of_a_failed_rank_get_jit_checkpoint_timeout_to_save_and_exit(daemon):
    d = await daemon("--num-workers", "3", "--jit-checkpoint-timeout", "30", command=SURVIVORS_SAVE)
    assert await d.finish() == 0
    waited = d.named("jit_checkpoint_wait")[0]
    assert waited["exited_on_their_own"] == [0, 2] and waited["still_alive"] == []
    assert sorted(p.name for p in d.workdir.glob("jit-*")) == ["jit-0", "jit-2"]
    assert d.named("teardown", why="recovery")[0]["terminated"] == []


@pytest.mark.parametrize("how", ["timeout 0", "no rank armed a save"])
async def test_without_jit_checkpoint_timeout_survivors_are_signalled_at_once(daemon, how):
    options, command = (("0", SURVIVORS_SAVE) if how == "timeout 0" else
                        ("600", [a for a in SURVIVORS_SAVE if a != "--arm-jit"]))
    d = await daemon("--num-workers", "3", "--jit-checkpoint-timeout", options, command=command)
    assert await d.finish() == 0
    assert d.named("jit_checkpoint_wait") == []
    assert sorted(d.named("teardown", why="recovery")[0]["terminated"]) == [0, 2]
    assert list(d.workdir.glob("jit-*")) == []


async def test_restart_budget_exhausted_ends_failed_with_exit_1(daemon):
    # the same failure at the same step each time: the budget alone judges it with the rules off
    d = await daemon("--max-restarts", "2", "--restart-backoff", "0", "--max-stalled-attempts", "0",
                     command=[*FAKE_WORKER, "--fail-rank", "0", "--fail-at-step", "1",
                              "--fail-attempts", "99"])
    assert await d.finish() == 1
    assert len(d.named("launching")) == 3
    assert d.states()[-2:] == ["RECOVERING", "FAILED"]
    assert d.events[-1]["state"] == "FAILED" and d.events[-1]["restarts"] == 2


async def test_sigterm_is_forwarded_and_exit_code_is_143(daemon):
    d = await daemon(command=[*FAKE_WORKER, *LONG])
    for rank in (0, 1):  # both have installed their SIGTERM handler once they print a step
        await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == rank)
    d.signal(signal.SIGTERM)
    assert await d.finish() == 143
    assert d.states()[-2:] == ["STOPPING", "STOPPED"]
    # each worker saw SIGTERM and stopped itself at a step boundary, within the grace period
    assert len(d.named("worker_output", worker_event="stopped")) == 2
    assert d.named("teardown")[0]["killed"] == []
    assert not any(pid_alive(p) for p in d.worker_pids())


async def test_sigint_gives_exit_130(daemon):
    d = await daemon(command=[*FAKE_WORKER, *LONG])
    await d.wait_for(lambda e: e["event"] == "state_changed" and e["to"] == "RUNNING")
    d.signal(signal.SIGINT)
    assert await d.finish() == 130
    assert d.events[-1]["state"] == "STOPPED"


async def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(daemon):
    d = await daemon("--grace-period", "0.5", "--max-restarts", "0",
                     command=[*FAKE_WORKER, *LONG, "--ignore-sigterm", "--fail-rank", "1", "--fail-at-step", "2",
                              "--startup-delay", "0.5"])
    assert await d.finish() == 1
    teardown = d.named("teardown")[0]
    assert teardown["killed"] == [0]
    assert 0.5 <= teardown["seconds"] < 5
    assert d.named("worker_exited", rank=0)[0]["signal"] == "SIGKILL"


async def test_second_sigint_kills_at_once(daemon):
    d = await daemon("--grace-period", "60", command=[*FAKE_WORKER, *LONG, "--ignore-sigterm"])
    for rank in (0, 1):  # each ignores SIGTERM from before its first step
        await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == rank)
    d.signal(signal.SIGINT)
    await d.wait_for(lambda e: e["event"] == "state_changed" and e["to"] == "STOPPING")
    t0 = time.monotonic()
    d.signal(signal.SIGINT)
    assert await d.finish() == 130
    assert time.monotonic() - t0 < 10  # not the 60 s grace period
    assert sorted(d.named("teardown")[0]["killed"]) == [0, 1]


async def test_teardown_kills_processes_a_worker_forked(daemon):
    d = await daemon("--max-restarts", "0", "--grace-period", "1",
                     command=[*FAKE_WORKER, *LONG, "--spawn-child", "--fail-rank", "1",
                              "--fail-at-step", "3"])
    assert await d.finish() == 1
    children = [e["worker_pid"] for e in d.named("worker_output", worker_event="child")]
    assert len(children) == 2
    assert not any(pid_alive(p) for p in children)


async def test_sigkill_of_the_daemon_leaves_no_worker_alive(daemon):
    d = await daemon(command=[*FAKE_WORKER, *LONG])
    await d.wait_for(lambda e: e.get("worker_event") == "step")
    assert all(pid_alive(p) for p in d.worker_pids())
    assert await d.sigkill(within=2) == []


async def test_floods_long_lines_and_binary_output_do_not_break_the_daemon(daemon):
    flood = 200_000
    d = await daemon("--max-line-bytes", "4096",
                     command=[*FAKE_WORKER, "--flood", str(flood), "--long-line", "5000000",
                              "--binary", "--steps", "0"])
    assert await d.finish(timeout=120) == 0
    logged = read_events(d.events_file)  # stdout may drop what this test reads too slowly
    # Every flood line is logged, or counted: dropped from the backlog (by rank), or lost to the
    # file's full buffer on a loaded machine (log_gap, all ranks' lines together).
    missing = 0
    for rank in (0, 1):
        out = matching(logged, "worker_output", rank=rank)
        dropped = sum(e["lines"] for e in matching(logged, "worker_output_dropped", rank=rank))
        missing += flood - sum(1 for e in out if e.get("line", "").startswith("flood line")) - dropped
    assert 0 <= missing <= sum(e["lines"] for e in matching(logged, "log_gap"))
    for rank in (0, 1):
        out = matching(logged, "worker_output", rank=rank)
        cut = [e for e in out if e.get("truncated")]
        assert len(cut) == 1 and cut[0]["line"] == "x" * 4096
        assert any(e.get("line") == "after long line" for e in out)
        assert any(e.get("line") == "bad \ufffd\ufffd utf8 \x00 nul" for e in out)
        assert any(e.get("line") == "{not json" for e in out)
    assert matching(logged, "supervisor_exit")[0]["state"] == "DONE"


async def test_events_file_mirrors_stdout_and_json_lines_are_merged(daemon, tmp_path):
    d = await daemon(command=[*FAKE_WORKER, "--steps", "2"])
    assert await d.finish() == 0
    written = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert written == d.events
    step = d.named("worker_output", rank=1, worker_event="step")[0]
    # the worker's own "rank", "event" and "step" keys do not overwrite the daemon's
    assert step["worker_rank"] == 1 and step["worker_step"] == 1 and step["stream"] == "stdout"
    for e in d.events:
        assert list(e)[:3] == ["timestamp", "level", "event"]


async def test_workers_get_the_torchrun_environment_and_a_fresh_port_per_attempt(daemon, tmp_path):
    d = await daemon("--num-workers", "2", "--max-restarts", "1",
                     command=[*FAKE_WORKER, "--print-env", "--fail-rank", "0", "--fail-at-step", "1"])
    assert await d.finish() == 0
    envs = {(e["rank"], e["restart"]): e["env"] for e in d.named("worker_output", worker_event="env")}
    # rank 1 of attempt 0 may be torn down before it prints; the others always print
    assert {(0, 0), (0, 1), (1, 1)} <= set(envs)
    env = envs[(1, 1)]
    assert env["RANK"] == env["LOCAL_RANK"] == "1"
    assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
    assert env["TORCHELASTIC_RESTART_COUNT"] == env["SUPERVISORD_FT_RESTART_COUNT"] == "1"
    assert env["SUPERVISORD_FT_CHECKPOINT_DIR"] == str(tmp_path / "ckpt")
    assert "SUPERVISORD_FT_RESUME_FROM" not in env  # no checkpoint exists: a fresh start
    assert envs[(0, 1)]["MASTER_PORT"] == env["MASTER_PORT"] != envs[(0, 0)]["MASTER_PORT"]


async def test_old_checkpoints_go_as_new_ones_appear_but_never_the_one_resumed_from(daemon, tmp_path):
    # rank 0 saves every step, as a script that writes straight to the final name and says nothing
    d = await daemon("--num-workers", "2", "--keep-checkpoints", "2", "--jit-checkpoint-timeout", "0",
                     command=[*FAKE_WORKER, "--steps", "8", "--step-time", "0.1", "--save-every", "1",
                              "--fail-rank", "1", "--fail-at-step", "3"])
    assert await d.finish() == 0
    resumed = d.named("checkpoint_selected")[-1]
    step = resumed["step"]
    assert checkpoints.steps(tmp_path / "ckpt") == [step + 8, step + 7]
    index = {id(e): i for i, e in enumerate(d.events)}
    pruned = d.named("checkpoint_pruned")
    last_exit = max(index[id(e)] for e in d.named("worker_exited", restart=1))
    assert any(index[id(e)] < last_exit for e in pruned)  # while the attempt ran
    gone = [index[id(e)] for e in pruned if e["path"] == resumed["path"]]
    assert len(gone) == 1 and gone[0] > last_exit  # at DONE, not while it could be needed


# The variables a rank may see differently under the daemon than under torchrun, each with why.
NOT_TORCHRUNS = {
    "PYTHONUNBUFFERED": "ours: set instead of torchrun's `python -u` (the command is the job's own)",
    "MASTER_ADDR": "`master_addr`, 127.0.0.1 as torchrun's --master-addr (--standalone says localhost)",
    "MASTER_PORT": "a free port each launch picks",
    "TORCHELASTIC_RUN_ID": "each invocation's own id (torchrun --standalone: a fresh uuid)",
    "TORCHELASTIC_ERROR_FILE": "each launcher's own folder for the ranks' error files",
    "TORCH_FR_BUFFER_SIZE": "ours: the flight recorder the channel reads (the job's own size wins)",
}


@pytest.mark.parametrize("virtual", [False, True], ids=["", "virtual-local-rank"])
async def test_a_rank_gets_torchruns_environment_variable_for_variable(daemon, tmp_path, monkeypatch, virtual):
    flags = ["--virtual-local-rank"] if virtual else []
    if virtual:  # each rank then sees its own entry alone, as LOCAL_RANK 0
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # both launchers then set it
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    script = str(JOBS / "dump_env.py")
    theirs, ours = tmp_path / "torchrun", tmp_path / "ours"
    theirs.mkdir(), ours.mkdir()
    torchrun = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
        *flags, script, str(theirs), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        _, err = await torchrun.communicate()
    assert torchrun.returncode == 0, err.decode()[-2000:]
    d = await daemon("--num-workers", "2", "--max-restarts", "0", "--standby", "--store-host", *flags,
                     command=[sys.executable, script, str(ours)])
    assert await d.finish() == 0
    assert [e["message"] for e in d.named("warning")] == [envvars.OMP_WARNING]
    for rank in (0, 1):
        a, b = (json.loads((folder / f"rank-{rank}.json").read_text()) for folder in (theirs, ours))
        mine = {k for k in b if k.startswith("SUPERVISORD_FT_")}
        assert a.keys() ^ b.keys() <= mine | NOT_TORCHRUNS.keys()
        assert {k: b[k] for k in a.keys() & b.keys() if a[k] != b[k]}.keys() <= NOT_TORCHRUNS.keys()
        assert b["OMP_NUM_THREADS"] == "1" and b["TORCHELASTIC_SIGNALS_TO_HANDLE"] == envvars.STOP_SIGNALS
        if virtual:
            assert (b["LOCAL_RANK"], b["CUDA_VISIBLE_DEVICES"]) == ("0", "3,5".split(",")[rank])


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
async def test_sighup_and_sigquit_stop_gracefully_like_sigterm(daemon, sig):
    d = await daemon(command=[*FAKE_WORKER, *LONG])
    for rank in (0, 1):
        await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == rank)
    d.signal(sig)
    assert await d.finish() == 128 + sig
    assert d.states()[-2:] == ["STOPPING", "STOPPED"]
    assert len(d.named("worker_output", worker_event="stopped")) == 2  # each stopped at a step
    assert d.events[-1]["event"] == "supervisor_exit" and d.events[-1]["exit_code"] == 128 + sig


async def test_sigusr1_is_forwarded_only_to_ranks_that_handle_it_and_training_goes_on(daemon):
    d = await daemon(command=[*FAKE_WORKER, *LONG, "--catch-usr1-rank", "0"])
    for rank in (0, 1):
        await d.wait_for(lambda e: e.get("worker_event") == "step" and e["rank"] == rank)
    d.signal(signal.SIGUSR1)
    forwarded = await d.wait_for(lambda e: e["event"] == "signal_forwarded")
    assert forwarded["signal"] == "SIGUSR1" and forwarded["ranks"] == [0] and forwarded["skipped"] == [1]
    await d.wait_for(lambda e: e.get("worker_event") == "usr1" and e["rank"] == 0)
    d.signal(signal.SIGUSR2)  # no rank handles it: nobody is sent one, nobody dies
    assert (await d.wait_for(lambda e: e["event"] == "signal_forwarded" and e["signal"] == "SIGUSR2"))["ranks"] == []
    await d.wait_for(lambda e: e["event"] == "worker_output" and e.get("worker_step") == 50)
    d.signal(signal.SIGTERM)
    assert await d.finish() == 143
    assert d.named("worker_exited", returncode=-signal.SIGUSR1) == []
    assert d.named("state_changed", to="RECOVERING") == []


async def test_nnodes_1_runs_alone_as_without_it_with_no_rendezvous_helper(daemon):
    d = await daemon("--nnodes", "1", "--rdzv-endpoint", "192.0.2.1:29400",
                     command=[*FAKE_WORKER, "--print-env"])
    assert await d.finish() == 0
    assert not d.named("rendezvous_helper_started") and not d.named("rendezvous_round")
    assert all("node_rank" not in e and "round" not in e for e in d.events)
    env = d.named("worker_output", worker_event="env")[0]["env"]
    assert env["GROUP_RANK"] == "0" and env["GROUP_WORLD_SIZE"] == "1"
    assert env["TORCHELASTIC_RUN_ID"] == d.events[0]["run_id"]  # the daemon's own, as before
