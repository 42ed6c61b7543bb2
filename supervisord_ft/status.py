"""``supervisord-ft status RUN_DIR``: a run in a few lines, like ``supervisorctl status``.

Reads the run dir through :mod:`runlog`, so it works while the daemon runs and after it ended;
``--json`` prints :meth:`runlog.Run.to_dict` for scripts.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from . import runlog


def lines(run: runlog.Run) -> list[str]:
    """The text ``status`` prints: one ``label  value`` line per fact."""
    started = datetime.fromisoformat(run.started)

    def at(t: float) -> str:
        return f"{started + timedelta(seconds=t):%H:%M:%S}"

    of = f" (run {run.run_index} of {run.runs_in_file})" if run.runs_in_file > 1 else ""
    out = [("run", f"{run.run_id}{of}, started {started:%Y-%m-%d %H:%M:%S} UTC")]
    out.append(("state", _state(run)))
    if run.step is not None:
        total = f" / {run.total_steps}" if run.total_steps else ""
        out.append(("step", f"{run.step}{total}"))
    out.append(("restarts", f"{run.restarts} ({len(run.attempts)} attempts)"))
    if (f := run.last_failure) is not None:
        out.append(("last failure", f"{at(f['at'])} {runlog.failure_text(f)}"))
    if (ck := run.checkpoint) is not None:
        out.append(("checkpoint", f"{at(ck.t)} step {ck.step}: {ck.path}"))
    if run.skipped_lines:
        out.append(("unreadable", f"{run.skipped_lines} lines of {run.path} skipped"))
    width = max(len(label) for label, _ in out)
    return [f"{label:<{width}}  {value}" for label, value in out]


def _state(run: runlog.Run) -> str:
    if run.daemon == "exited":
        return f"{run.state} (exit {run.exit_code})"
    if run.daemon == "running":
        return f"{run.state} (daemon pid {run.pid})"
    if run.daemon == "elsewhere":
        return f"{run.state} as last logged (daemon pid {run.pid} on {run.host}, not checked)"
    return f"daemon gone: pid {run.pid} ended without supervisor_exit; last state {run.state}"


def main(run_dir: Path, run_id: str | None, as_json: bool) -> int:
    run = runlog.summarise(runlog.read(run_dir), run_id)
    print(json.dumps(run.to_dict()) if as_json else "\n".join(lines(run)))
    return 0
