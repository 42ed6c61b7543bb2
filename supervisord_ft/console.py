"""The console for a person: what happened, in a few lines, above a live status area.

A view: it subscribes to the event bus and sees exactly the events ``events.jsonl`` gets. It
prints only what a person should read (state changes, failures with the rank's last stderr
lines, recoveries with their duration and the steps redone, checkpoint decisions, warnings);
per-step lines stay in ``events.jsonl`` unless ``show_steps``. Below them, on a terminal, a
status area redrawn in place a few times a second: state, attempt, step / total with a bar,
steps per second, loss, ETA, restarts used / budget, time since the newest checkpoint.

It writes through the same non-blocking stdout writer as the JSON format, so a paused terminal
never stalls the loop. ``rich`` does the drawing; it honours ``NO_COLOR`` and ``TERM=dumb``, and
on anything that is not a terminal it writes plain lines with no control characters.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from .output import worker_field

STDERR_CONTEXT = 5  # a failed rank's last stderr lines shown with its failure
RATE_WINDOW = 20  # steps/s is measured over this many recent step reports
STATE_STYLE = {"RUNNING": "green", "DONE": "bold green", "RECOVERING": "yellow",
               "LAUNCHING": "cyan", "STOPPING": "yellow", "STOPPED": "bold yellow",
               "FAILED": "bold red"}
QUIET = frozenset({"status", "worker_started", "launching", "supervisor_start", "teardown",
                   "checkpoint_selected", "state_changed", "recovered", "worker_exited",
                   "supervisor_exit", "hang_detected", "worker_output"})


class Sink(Protocol):
    """Where the console's text goes (:class:`.stdio.StdoutWriter`)."""

    def write(self, line: str) -> bool: ...

    def isatty(self) -> bool: ...


class _File:
    """The file-like face ``rich`` writes to; each write is queued, never waited for."""

    encoding = "utf-8"

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def write(self, text: str) -> int:
        self._sink.write(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self._sink.isatty()


@dataclass
class RunState:
    """What the status area shows, kept from the events alone."""

    state: str = "LAUNCHING"
    attempt: int | None = None
    restarts: int = 0
    max_restarts: int = 0
    total_steps: int | None = None
    step: int = 0
    loss: float | None = None
    checkpoint_at: float | None = None  # monotonic time of the newest checkpoint seen
    steps_at: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    attempt_max_step: int = 0  # the highest step reported by the current attempt
    steps_before_failure: int = 0  # that, when a rank of it failed
    resume_step: int = 0  # the step the current attempt resumed from
    stderr: dict[int, deque[str]] = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        if len(self.steps_at) < 2:
            return None
        (t0, s0), (t1, s1) = self.steps_at[0], self.steps_at[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


class ConsoleView:
    """Subscribe it to the bus; :meth:`close` prints the final status once at the end."""

    def __init__(self, sink: Sink, *, show_steps: bool = False) -> None:
        from rich.console import Console
        from rich.live import Live

        self.run = RunState()
        self.show_steps = show_steps
        terminal = sink.isatty()
        self.console = Console(file=_File(sink), force_terminal=terminal, highlight=False,
                               soft_wrap=True, width=None if terminal else 120)
        self.live = Live(self._status(), console=self.console, refresh_per_second=4,
                         auto_refresh=self.console.is_interactive, redirect_stdout=False,
                         redirect_stderr=False)
        self.live.start()

    def __call__(self, event: dict[str, Any]) -> None:
        for line in self._lines(event):
            self.live.console.print(line)
        self.live.update(self._status(), refresh=False)

    def close(self) -> None:
        self.live.update(self._status())
        self.live.stop()

    # -- what is printed --------------------------------------------------------------------
    def _lines(self, e: dict[str, Any]) -> list[str]:
        run, name = self.run, e["event"]
        if name == "supervisor_start":
            cfg = e.get("config", {})
            run.max_restarts = cfg.get("max_restarts", 0)
            if not cfg.get("command"):
                run.total_steps = cfg.get("epochs", 0) * cfg.get("steps", 0) or None
            job = " ".join(cfg.get("command") or ["the built-in job"])
            return [f"[bold]supervisord-ft[/] pid {e.get('pid')}: {cfg.get('num_workers')} "
                    f"workers running {_esc(job)}"]
        if name == "worker_output":
            return self._output(e)
        if name == "state_changed":
            run.state, run.restarts = e["to"], e.get("restart", run.restarts)
            style = STATE_STYLE.get(e["to"], "")
            return [f"[{style}]{e['to']}[/]  {_esc(str(e.get('reason', '')))}"]
        if name == "launching":
            run.attempt, run.attempt_max_step = e.get("attempt"), 0
            run.stderr.clear()
            return []
        if name == "checkpoint_selected":
            if e.get("step") is None:
                run.resume_step = 0
                return ["no checkpoint: starting fresh"]
            run.resume_step = e["step"]
            return [f"checkpoint selected: step {e['step']}  [dim]{_esc(str(e['path']))}[/]"]
        if name == "worker_exited":
            return self._exited(e)
        if name == "hang_detected":
            run.steps_before_failure = run.attempt_max_step
            return [f"[bold red]rank {e['rank']} hung[/]: no output for {e['silent_for']:.1f} s"
                    + (" before its first step" if e.get("before_first_step") else "")]
        if name == "recovered":
            redone = max(0, run.steps_before_failure - run.resume_step)
            return [f"[green]recovered[/] in {e['seconds']:.2f} s: resumed from step "
                    f"{run.resume_step}, {redone} steps redone"]
        if name == "teardown" and e.get("killed"):
            return [f"[yellow]teardown[/]: ranks {e['killed']} needed SIGKILL "
                    f"({e['seconds']:.2f} s)"]
        if name == "supervisor_exit":
            style = STATE_STYLE.get(e["state"], "")
            return [f"[{style}]{e['state']}[/]: exit {e['exit_code']}, {e['restarts']} restarts, "
                    f"step {run.step}"]
        if name not in QUIET and e.get("level") in ("warning", "error"):
            return [f"[yellow]{name}[/] " + _esc(_fields(e))]
        if name in ("checkpoint_pruned", "signal_forwarded"):
            return [f"{name} " + _esc(_fields(e))]
        return []

    def _output(self, e: dict[str, Any]) -> list[str]:
        run = self.run
        if e.get("attempt") != run.attempt:
            return []
        if e.get("stream") == "stderr" and "line" in e:
            run.stderr.setdefault(e["rank"], deque(maxlen=STDERR_CONTEXT)).append(e["line"])
            return []
        kind = e.get("worker_event")
        step = worker_field(e, "step")
        if kind == "step" and isinstance(step, int):
            if step > run.step or step > run.attempt_max_step:
                run.steps_at.append((time.monotonic(), step))
            run.step = step
            run.attempt_max_step = max(run.attempt_max_step, step)
            if isinstance(e.get("loss"), (int, float)):
                run.loss = e["loss"]
            if self.show_steps:
                return [f"[dim]rank {e['rank']} step {step}"
                        + (f" loss {e['loss']:.4g}" if isinstance(e.get("loss"), float) else "")
                        + "[/]"]
        elif kind == "checkpoint_saved":
            run.checkpoint_at = time.monotonic()
        return []

    def _exited(self, e: dict[str, Any]) -> list[str]:
        if e.get("returncode") == 0 or e.get("attempt") != self.run.attempt:
            return []
        how = f"signal {e['signal']}" if "signal" in e else f"exit code {e['returncode']}"
        if self.run.state in ("RECOVERING", "STOPPING"):  # a peer of the failure, torn down
            return [f"[dim]rank {e['rank']} ended during teardown: {how}[/]"]
        self.run.steps_before_failure = self.run.attempt_max_step
        lines = [f"[bold red]rank {e['rank']} failed[/]: {how} after {e.get('runtime', 0):.1f} s"]
        lines += [f"  [dim]| {_esc(line)}[/]" for line in self.run.stderr.get(e["rank"], ())]
        return lines

    # -- the status area ---------------------------------------------------------------------
    def _status(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        run = self.run
        parts = [f"[{STATE_STYLE.get(run.state, '')}]{run.state}[/]"]
        if run.attempt is not None:
            parts.append(f"attempt {run.attempt}")
        grid = Table.grid(padding=(0, 1))
        if run.total_steps:
            parts.append(f"step {run.step}/{run.total_steps}")
        else:
            parts.append(f"step {run.step}")
        rate = run.rate
        if rate:
            parts.append(f"{rate:.1f} steps/s")
        if run.loss is not None:
            parts.append(f"loss {run.loss:.4g}")
        if rate and run.total_steps and run.state == "RUNNING":
            parts.append(f"ETA {_duration((run.total_steps - run.step) / rate)}")
        parts.append(f"restarts {run.restarts}/{run.max_restarts}")
        if run.checkpoint_at is not None:
            parts.append(f"checkpoint {_duration(time.monotonic() - run.checkpoint_at)} ago")
        if run.total_steps:
            grid.add_row(ProgressBar(total=run.total_steps, completed=min(run.step, run.total_steps),
                                     width=24), "  ".join(parts))
        else:
            grid.add_row("  ".join(parts))
        return grid


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fields(e: dict[str, Any]) -> str:
    skip = {"timestamp", "level", "event"}
    return " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)
