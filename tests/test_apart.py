"""The daemon installed apart from the training environment (pipx, a venv of its own): nothing of
ours but what the standby and channel need reaches the job's interpreter, and a Lightning job
picks the defaults it picks without supervisord-ft (its progress bar: rich, a dependency of the
daemon's, would make it choose RichProgressBar)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from harness import pool_ready

pytestmark = pytest.mark.e2e
# The daemon's own packages and dependencies: what a training environment without it lacks.
DAEMON_ONLY = ("supervisord_ft", "rich", "structlog", "uvloop", "prometheus_client", "__editable__")

PROBE = """
import importlib.util, os, sys
import lightning as L
had = sorted(n for n in ("supervisord_ft", "supervisord_ft_worker", "rich", "structlog", "uvloop")
             if importlib.util.find_spec(n) is not None)
bar = L.Trainer(accelerator="cpu", devices=1, logger=False).progress_bar_callback
print("found:", had, "bar:", type(bar).__name__, flush=True)
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
    with open(os.environ["PROBE_GO"], "rb", buffering=0) as go:
        go.read(1)
    sys.exit(1 if os.environ["RANK"] == "1" else 0)
"""


def training_environment(where: Path) -> Path:
    """A venv whose site-packages holds everything of ours but the daemon's own packages and
    dependencies (links, made in a second); its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = Path(subprocess.run([str(where / "bin" / "python"), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    for entry in ours.iterdir():
        if not entry.name.lower().replace("-", "_").startswith(DAEMON_ONLY) and not (theirs / entry.name).exists():
            (theirs / entry.name).symlink_to(entry)
    return where / "bin" / "python"


async def test_a_job_in_its_own_environment_sees_nothing_of_the_daemons_cold_or_warm(daemon, tmp_path):
    pytest.importorskip("lightning")
    python = training_environment(tmp_path / "train-env")
    (tmp_path / "probe.py").write_text(PROBE)
    go = tmp_path / "go"
    os.mkfifo(go)
    fd = os.open(go, os.O_RDWR)
    os.environ["PROBE_GO"] = str(go)
    try:
        # The daemon is installed (editable) in the test's venv: no PYTHONPATH leads the job to it.
        d = await daemon("--standby", "--max-restarts", "1", "--restart-backoff", "0",
                         command=[str(python), "probe.py"], env={"PYTHONPATH": ""})
    finally:
        del os.environ["PROBE_GO"]
    try:
        learnt = await d.wait_for(lambda e: e["event"] == "preload_learnt" and "lightning" in e["packages"],
                                  timeout=90)
        standbys = await pool_ready(d, learnt=learnt["total"], timeout=90)
        # Where `python -m supervisord_ft_standby` found our package: a directory with it alone,
        # not the daemon's site-packages (which holds a torch of its own when installed apart).
        assert {tuple(os.listdir(os.readlink(f"/proc/{pid}/cwd"))) for pid in standbys} == \
            {("supervisord_ft_standby",)}
        os.write(fd, b"gg")  # attempt 0 ends with rank 1's exit 1; attempt 1 runs in the standbys
        assert await d.finish(timeout=90) == 0
    finally:
        os.close(fd)
    said = {(e["attempt"], e["rank"]): e["line"] for e in d.named("worker_output")
            if e.get("line", "").startswith("found:")}
    assert set(said.values()) == {"found: [] bar: TQDMProgressBar"} and len(said) == 4, said
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == \
        {e["standby_pid"] for e in d.named("standby_state", to="handed_out")}
