"""deploy/: each file checked by the tool made for it, and for the facts the README promises."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from harness import ROOT
from supervisord_ft.cli import load_config, parser
from supervisord_ft.config import Config
from supervisord_ft.errors import EXIT_FAILED, EXIT_SIGNAL_BASE, EXIT_USAGE
from supervisord_ft.supervisor import STOP_SIGNALS

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "supervisord-ft.service"
STORE_UNIT = DEPLOY / "supervisord-ft-rdzv-store.service"
SBATCH = DEPLOY / "supervisord-ft.sbatch"
JOB = DEPLOY / "supervisord-ft-job.yaml"
GRACE = Config().grace_period
KUBERNETES = "1.31.0"  # the oldest release where podFailurePolicy is GA


def unit_settings(unit: Path = UNIT) -> dict[str, str]:
    settings = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def assert_daemon_accepts(argv: list[str]) -> None:
    """The shipped command line parses with the daemon's own parser (flags spelled right)."""
    assert Path(argv[0]).name == "supervisord-ft" and argv[1] == "run"
    parser().parse_args(argv[1:])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
@pytest.mark.parametrize("shipped", [UNIT, STORE_UNIT], ids=lambda p: p.name)
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path, shipped: Path):
    # verify insists that ExecStart's program exists: point it at this checkout's entry point.
    exe = Path(sys.executable).with_name("supervisord-ft")
    assert exe.exists(), "install the package first (make venv)"
    unit = tmp_path / shipped.name
    unit.write_text(shipped.read_text().replace("/opt/supervisord-ft/.venv/bin/supervisord-ft", str(exe)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_the_systemd_unit_is_notify_watched_and_never_restarts_what_cannot_succeed():
    s = unit_settings()
    assert s["Type"] == "notify" and int(s["WatchdogSec"]) > 0
    assert s["KillMode"] == "control-group" and s["Restart"] == "on-failure"
    assert set(s["SuccessExitStatus"].split()) == {str(EXIT_SIGNAL_BASE + sig) for sig in STOP_SIGNALS}
    assert set(s["RestartPreventExitStatus"].split()) == {str(EXIT_FAILED), str(EXIT_USAGE)}
    assert float(s["TimeoutStopSec"]) > GRACE
    assert_daemon_accepts(shlex.split(s["ExecStart"]))


def test_the_store_unit_runs_the_store_command_and_restarts_it():
    s = unit_settings(STORE_UNIT)
    argv = shlex.split(s["ExecStart"])
    assert Path(argv[0]).name == "supervisord-ft" and argv[1] == "rdzv-store"
    assert parser().parse_args(argv[1:]).endpoint == "head.cluster:29400"
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM"


def test_the_kubernetes_job_validates_against_the_kubernetes_schema():
    doc = yaml.safe_load(JOB.read_text())
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on any unknown or bad field


def test_the_kubernetes_job_probes_the_daemon_and_lets_it_stop_gracefully():
    pod = yaml.safe_load(JOB.read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"]
    assert_daemon_accepts(argv)  # exec form, no shell: the daemon is PID 1
    port = int(argv[argv.index("--metrics-port") + 1])
    assert argv[argv.index("--metrics-addr") + 1] == "0.0.0.0"  # the kubelet probes the pod IP
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["kill", "-USR1", "1"]
    assert pod["terminationGracePeriodSeconds"] > GRACE


def test_the_slurm_script_is_one_node_signals_before_the_limit_and_requeues():
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    assert {"--nodes=1", "--signal=B:USR1@120", "--requeue"} <= set(directives)
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck)")
def test_the_slurm_script_passes_shellcheck():
    out = subprocess.run(["shellcheck", str(SBATCH)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


STUB_DAEMON = """#!/bin/bash
trap 'echo daemon got USR1' USR1
trap 'echo daemon got TERM; exit 143' TERM
echo "daemon $$ started: $*"
while true; do sleep 0.1; done  # short, so that no sleep outlives the stub
"""


async def test_the_slurm_script_forwards_usr1_requeues_and_outlives_the_final_sigterm(tmp_path: Path):
    """SLURM is played by hand: USR1 to the batch shell, then SIGTERM to every process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("supervisord-ft", STUB_DAEMON),
                       ("scontrol", '#!/bin/bash\necho "scontrol $*"\n')):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    shell = await asyncio.create_subprocess_exec("bash", str(SBATCH), cwd=tmp_path, env=env,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 start_new_session=True)  # cleanup: its group
    assert shell.stdout is not None
    try:
        async with asyncio.timeout(30):
            started = (await shell.stdout.readline()).decode()
            assert started.endswith("started: run --config configs/demo.toml --log-format json\n")
            shell.send_signal(signal.SIGUSR1)
            said = {(await shell.stdout.readline()).decode().strip() for _ in range(2)}
            assert said == {"daemon got USR1", "scontrol requeue 42"}
            shell.send_signal(signal.SIGTERM)
            os.kill(int(started.split()[1]), signal.SIGTERM)
            assert (await shell.stdout.readline()).decode() == "daemon got TERM\n"
            assert await shell.wait() == 143  # the daemon's code, not the shell killed by TERM
    finally:
        try:
            os.killpg(shell.pid, signal.SIGKILL)  # the shell, the stub daemon and its sleep
        except ProcessLookupError:
            pass


MULTINODE = DEPLOY / "supervisord-ft-multinode.yaml"


def test_the_multinode_kubernetes_example_validates_and_points_every_pod_at_pod_0():
    service, job = yaml.safe_load_all(MULTINODE.read_text())
    for doc in (service, job):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"]
    assert_daemon_accepts(argv)
    args = argv[1:]
    del args[args.index("--config"):args.index("--config") + 2]  # the ConfigMap is not here
    cfg = load_config(args)
    name = job["metadata"]["name"]
    assert cfg.node_range == (job["spec"]["completions"],) * 2 and job["spec"]["completionMode"] == "Indexed"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert cfg.rdzv_endpoint == f"{name}-0.{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert {e["name"] for e in container["env"]} >= {"POD_IP", "JOB_COMPLETION_INDEX"}
    assert pod["terminationGracePeriodSeconds"] > GRACE
