"""``supervisord-ft status RUN_DIR``: a run in a few lines, like ``supervisorctl status``.

Reads the run dir through :mod:`runlog`, so it works while the daemon runs and after it ended;
``--json`` prints :meth:`runlog.Run.to_dict` for scripts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from . import runlog

HANGS_SHOWN = 3  # the latest hung attempts shown; --json has them all


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
    out += _hangs(run, at)
    if (ck := run.checkpoint) is not None:
        out.append(("checkpoint", f"{at(ck.t)} step {ck.step}: {ck.path}"))
    if run.skipped_lines:
        out.append(("unreadable", f"{run.skipped_lines} lines of {run.path} skipped"))
    width = max(len(label) for label, _ in out)
    return [f"{label:<{width}}  {value}" for label, value in out]


def _hangs(run: runlog.Run, at: Callable[[float], str]) -> list[tuple[str, str]]:
    """Each hung attempt: where the ranks were (the diagnosis's summary, else the loop's
    reason), the laggards, and the directory of the ranks' stack files."""
    hung = [a for a in run.attempts if a.hung]
    out: list[tuple[str, str]] = []
    if len(hung) > HANGS_SHOWN:
        out.append(("hangs", f"{len(hung)}; the last {HANGS_SHOWN} below, all in --json"))
    for a in hung[-HANGS_SHOWN:]:
        d = a.diagnosis
        when = f" at {at(a.detected_at)}" if a.detected_at is not None else ""
        what = (d.summary if d is not None else None) or a.cause or f"rank {a.failed_rank} hung"
        out.append(("hang", f"attempt {a.id}{when}: {what}"))
        if d is None:
            continue
        out += [("  laggards", runlog.laggards_text(d)), ("  stacks", runlog.stacks_text(d))]
    return out


def _state(run: runlog.Run) -> str:
    if run.daemon == "exited":
        return f"{run.state} (exit {run.exit_code})"
    if run.daemon == "running":
        return f"{run.state} (daemon pid {run.pid})"
    if run.daemon == "elsewhere":
        return f"{run.state} as last logged (daemon pid {run.pid} on {run.host}, not checked)"
    return f"daemon gone: pid {run.pid} ended without supervisor_exit; last state {run.state}"


def main(run_dir: Path, run_id: str | None, as_json: bool) -> int:
    run = runlog.summarise(runlog.read(run_dir, every_step=False), run_id)
    print(json.dumps(run.to_dict()) if as_json else "\n".join(lines(run)))
    return 0
