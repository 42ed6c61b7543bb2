"""torchrun's command line: the same words start the same job, checked against torchrun's own parser."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from harness import ROOT, Daemon
from supervisord_ft.cli import load_config
from supervisord_ft.errors import EXIT_USAGE, ConfigError
from supervisord_ft.torchrun import IGNORED

JOBS = Path(__file__).with_name("jobs")
SCRIPT = str(JOBS / "ddp_faults.py")
SHELL = "/bin/sh"  # any executable for --no-python

# Command lines as torchrun users write them (torch's test/distributed/launcher/run_test.py has
# the same shapes): options before the script, the script's own options after it, even where they
# are spelled like ours or torchrun's.
SAME_WORDS = [
    ["--nproc-per-node", "2", "--max-restarts", "2", SCRIPT, "--x", "1"],
    ["--nproc_per_node=3", "--max_restarts=1", SCRIPT],
    ["-m", "pkg.mod", "--lr", "0.1"],
    ["--module", "--nproc-per-node", "2", "pkg.mod"],
    ["--no-python", SHELL, "-c", "exit 0"],
    ["--run-path", "--no-python", SCRIPT, "a"],
    ["--standalone", "--nnodes", "1", "--nproc-per-node", "2", SCRIPT, "--max-restarts", "7",
     "--nproc-per-node", "9", "-m", "--", "tail"],
    ["--nnodes", "1:1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
     "--rdzv-id", "job", SCRIPT],
    ["--rdzv_backend=static", "--master-addr", "127.0.0.1", "--master-port", "29511", SCRIPT],
    ["--nproc-per-node", "cpu", SCRIPT],
    ["--shutdown-timeout", "7", "--role", "trainer", "--virtual-local-rank", SCRIPT],
    ["--monitor-interval", "1", "--start-method", "fork", "--event-log-handler", "null",
     "--duplicate-stdout-filters", "a,b", "--signals-to-handle", "SIGTERM,SIGUSR1", "--node-rank", "0",
     SCRIPT],
]


@pytest.mark.parametrize("argv", SAME_WORDS, ids=lambda argv: " ".join(argv)[:60])
def test_a_torchrun_command_line_means_what_it_means_to_torchrun(argv, monkeypatch):
    from torch.distributed.run import config_from_args, get_args_parser, run_script_path

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it in os.environ
    theirs, cmd, cmd_args = config_from_args(get_args_parser().parse_args(argv))
    ours = load_config(argv, torchrun_form=True)
    if cmd is run_script_path:
        expected = [sys.executable, *cmd_args]
    else:  # ranks get PYTHONUNBUFFERED=1 instead of -u (tests/test_env.py)
        expected = [cmd, *[a for a in cmd_args[:1] if a != "-u"], *cmd_args[1:]]
    assert list(ours.command) == expected
    assert ours.num_workers == theirs.nproc_per_node
    assert ours.max_restarts == theirs.max_restarts
    assert ours.grace_period == theirs.shutdown_timeout
    assert ours.role == theirs.role
    assert ours.virtual_local_rank == theirs.virtual_local_rank
    if "--master-port" in argv:
        assert (ours.master_addr, ours.master_port) == ("127.0.0.1", 29511)


def test_supervisord_ft_run_takes_the_same_words_with_its_own_defaults():
    ours = load_config(["run", SCRIPT, "--steps", "5"])
    assert ours.command == (sys.executable, SCRIPT, "--steps", "5")
    assert (ours.num_workers, ours.max_restarts) == (2, 3)  # ours: torchrun-ft takes torchrun's
    # The `--` form is unchanged, and a `--` among a script's own arguments stays there.
    assert load_config(["run", "--", sys.executable, SCRIPT]).command == (sys.executable, SCRIPT)
    assert load_config(["run", SCRIPT, "--", "x"]).command == (sys.executable, SCRIPT, "--", "x")
    assert load_config(["run"]).builtin_job


def test_python_exec_picks_the_interpreter_as_torchruns_does(monkeypatch):
    monkeypatch.setenv("PYTHON_EXEC", "/bin/sh")
    assert load_config(["-m", "pkg"], torchrun_form=True).command == ("/bin/sh", "-m", "pkg")


@pytest.mark.parametrize("argv, error", [
    (["--no-python", "-m", SHELL], "module: don't use both --no-python and -m/--module"),
    (["run", "-m", "--", sys.executable, SCRIPT], "module: applies to a SCRIPT given as torchrun's"),
    (["run", "--no-python"], "no_python: applies to a SCRIPT given as torchrun's, not to the built-in job"),
    (["--standalone", "--nnodes", "2", "--rdzv-endpoint", "h:1", SCRIPT],
     "standalone: one node with its own rendezvous, but nnodes is 2"),
    (["--nnodes", "2", "--rdzv-backend", "static", "--node-rank", "1", SCRIPT],
     "rdzv_backend: static: nodes meet through c10d here"),
    (["--nnodes", "2", "--rdzv-backend", "static", "--rdzv-endpoint", "h:1", SCRIPT],
     "rdzv_backend: static: nodes meet through c10d here"),
    (["--nproc-per-node", "many", SCRIPT], "num_workers (from command line): expected int, got 'many'"),
    ([], "usage: the following arguments are required: SCRIPT"),
])
def test_what_torchrun_refuses_or_we_cannot_do_is_one_line_naming_it(argv, error):
    torchrun_form = argv[:1] != ["run"]
    with pytest.raises(ConfigError, match="^" + error.replace("(", r"\(").replace(")", r"\)")):
        load_config(argv, torchrun_form=torchrun_form)


def test_gpu_counts_the_visible_devices_without_torch(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3,-1,5")
    assert load_config(["--nproc-per-node", "gpu", SCRIPT], torchrun_form=True).num_workers == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="^num_workers: gpu: no GPU found"):
        load_config(["--nproc-per-node", "gpu", SCRIPT], torchrun_form=True)
    assert load_config(["--nproc-per-node", "auto", SCRIPT], torchrun_form=True).num_workers == \
        len(os.sched_getaffinity(0))


async def test_torchrun_ft_runs_a_foreign_script_unchanged_and_recovers_it(tmp_path):
    """The entry point a job script gets by changing one word: torchrun's options, the script's
    own arguments after it, a crash recovered (from the script's own checkpoint), the meaningless
    options said once each."""
    torchrun_ft = Path(sys.executable).with_name("torchrun-ft")
    d = await Daemon.start(tmp_path, "--nproc-per-node", "2", "--max-restarts", "1",
                           "--monitor-interval", "0.5", "--start-method", "spawn",
                           SCRIPT, "--steps", "40", "--save-every", "10", "--step-time", "0.02",
                           "--raise-rank", "1", "--raise-step", "25", "--fault-attempts", "1",
                           program=[str(torchrun_ft)])
    try:
        assert await d.finish(timeout=120) == 0, d.stderr
        ignored = d.named("torchrun_option_ignored")
        assert [(e["option"], e["value"]) for e in ignored] == [("--monitor-interval", "0.5"),
                                                               ("--start-method", "spawn")]
        assert all(e["why"] == next(o.why for o in IGNORED if o.flags[0] == e["option"]) for e in ignored)
        start = d.named("supervisor_start")[0]["config"]
        assert start["command"] == [sys.executable, SCRIPT, "--steps", "40", "--save-every", "10",
                                    "--step-time", "0.02", "--raise-rank", "1", "--raise-step",
                                    "25", "--fault-attempts", "1"]
        assert [e["restart"] for e in d.named("worker_started")] == [0, 0, 1, 1]
        assert d.named("worker_exited", rank=1, restart=0)[0]["returncode"] == 1
        resumed = [e["line"] for e in d.named("worker_output", rank=0, restart=1)]
        assert resumed[0].startswith("step 20 ")  # from the script's own checkpoint at step 20
    finally:
        await d.kill()


async def test_a_module_runs_with_dash_m_from_the_working_directory(daemon, tmp_path):
    (tmp_path / "mymod.py").write_text("import os\nprint('module rank', os.environ['RANK'], flush=True)\n")
    d = await daemon("--nproc-per-node", "2", "--max-restarts", "0", "--no-standby",
                     "--no-store-host", "-m", "mymod")
    assert await d.finish() == 0, d.stderr
    said = sorted(e["line"] for e in d.named("worker_output") if "module rank" in e.get("line", ""))
    assert said == ["module rank 0", "module rank 1"]


async def test_an_ignored_option_with_a_bad_config_still_exits_2(tmp_path):
    code, _, err = await _cli(tmp_path, "--monitor-interval", "1", "--nproc-per-node", "0", SCRIPT)
    assert code == EXIT_USAGE and err.count("\n") == 1 and "num_workers" in err


async def _cli(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    import asyncio
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("torchrun-ft")), *argv, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()
