"""Frameworks we did not write, under the daemon with no configuration: PyTorch Lightning and HF
accelerate with a tiny transformers model (``tests/jobs``, the ``frameworks`` extra). Each
recovers from a rank's crash in standbys that had learnt the framework's imports, and resumes
from its own checkpoint."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from harness import pool_ready
from supervisord_ft.errors import EXIT_SIGNAL_BASE

pytestmark = pytest.mark.e2e
JOBS = Path(__file__).with_name("jobs")
# The job's script and arguments, the packages it must be learnt to import, and a line of its own
# that says it resumed from a checkpoint it wrote.
FRAMEWORKS = {
    "lightning": (["lightning_ddp.py", "--steps", "100000", "--step-time", "0.02", "--save-every", "20",
                   "--devices", "2"], {"lightning"}, "Restoring states from the checkpoint path at "),
    "accelerate": (["accelerate_hf.py", "--steps", "100000", "--save-every", "10"],
                   {"accelerate", "transformers"}, "resuming at step "),
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_framework_job_recovers_warm_with_what_it_imports_learnt_and_resumes_from_its_checkpoint(
        daemon, tmp_path, framework):
    pytest.importorskip(framework)
    (script, *args), packages, resumed = FRAMEWORKS[framework]
    crash = tmp_path / "crash"
    d = await daemon("--standby", "--store-host", "--max-restarts", "1", "--restart-backoff", "0",
                     "--grace-period", "5",
                     command=[sys.executable, str(JOBS / script), *args, "--crash-when", str(crash)])
    learnt = await d.wait_for(lambda e: e["event"] == "preload_learnt" and packages <= set(e["packages"]),
                              timeout=90)
    await pool_ready(d, learnt=learnt["total"], timeout=90)
    crash.touch()  # rank 1 raises at its next step
    await d.wait_for(lambda e: e["event"] == "worker_output" and e.get("attempt") == 1
                     and e.get("line", "").startswith(resumed), timeout=90)
    line = next(e["line"] for e in d.named("worker_output", attempt=1) if e.get("line", "").startswith(resumed))
    assert not line.endswith(("step 0", "at None"))  # from a checkpoint it wrote in attempt 0
    handed = {e["standby_pid"] for e in d.named("standby_state", to="handed_out")}
    assert {e["pid"] for e in d.named("worker_started", attempt=1)} == handed and len(handed) == 2
    d.proc.send_signal(signal.SIGTERM)
    assert await d.finish(timeout=60) == EXIT_SIGNAL_BASE + signal.SIGTERM
    assert d.named("worker_exited", rank=1, attempt=0)[0]["returncode"] == 1
