"""The console for a person: what happened, in a few lines, above a live status area.

A view: it subscribes to the event bus and sees exactly the events ``events.jsonl`` gets. It
prints only what a person should read (state changes, failures with the rank's last stderr
lines, hangs with where the laggards are, recoveries with their duration and the steps redone,
checkpoint decisions, warnings);
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

from . import runlog
from .output import worker_field

STDERR_CONTEXT = 5  # a failed rank's last stderr lines shown with its failure
FRAMES_SHOWN = 5  # a laggard's innermost frames shown with a hang's diagnosis
RANKS_SHOWN = 3  # ranks whose frames or missing answers are shown; the stack files hold all
RATE_WINDOW = 20  # steps/s is measured over this many recent step reports
STATE_STYLE = {"RUNNING": "green", "DONE": "bold green", "RECOVERING": "yellow",
               "LAUNCHING": "cyan", "STOPPING": "yellow", "STOPPED": "bold yellow",
               "FAILED": "bold red"}
QUIET = frozenset({"status", "worker_started", "launching", "supervisor_start", "teardown",
                   "checkpoint_selected", "state_changed", "recovered", "worker_exited",
                   "supervisor_exit", "hang_detected", "worker_output", "hang_diagnosed",
                   "failure_diagnosed", "channel_unavailable", "hang_timeout_learnt",
                   "failure_explained"})


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
    hang_said: int | None = None  # the attempt whose hang was printed (each rank's is logged)
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
            return self._hung(e)
        if name == "hang_diagnosed":
            return _diagnosis(e)
        if name == "failure_diagnosed":
            return [f"[yellow]survivors of rank {e.get('rank')}[/]: "
                    f"{_esc(str(e.get('summary') or 'no summary'))}"
                    + _stacks(e, "  [dim]stacks: {}[/]")]
        if name == "channel_unavailable":
            return [f"[dim]rank {e.get('rank')} has no channel: {_esc(str(e.get('reason')))}; "
                    f"judged by {_esc(str(e.get('judged_by')))}[/]"]
        if name == "hang_timeout_learnt":
            return [f"[dim]hang limit now {_seconds(e.get('timeout'))} (longest interval "
                    f"{_seconds(e.get('longest_interval'))} in {e.get('samples')} samples, "
                    f"at most {_seconds(e.get('cap'))})[/]"]
        if name == "failure_explained":
            return [f"[bold red]cause[/]: {_esc(runlog.Explained.of(e).text())}"]
        if name == "recovered":
            redone = max(0, run.steps_before_failure - run.resume_step)
            phases = e.get("phases")
            return [f"[green]recovered[/] in {e['seconds']:.2f} s: resumed from step "
                    f"{run.resume_step}, {redone} steps redone"
                    + (f"  [dim]({_esc(runlog.phases_text(phases))})[/]" if isinstance(phases, dict) else "")]
        if name == "teardown" and e.get("killed"):
            return [f"[yellow]teardown[/]: ranks {e['killed']} needed SIGKILL "
                    f"({e['seconds']:.2f} s)"]
        if name == "supervisor_exit":
            style = STATE_STYLE.get(e["state"], "")
            return [f"[{style}]{e['state']}[/]: exit {e['exit_code']}, {e['restarts']} restarts, "
                    f"step {run.step}"]
        if name == "warning":  # a message in torchrun's words: one line, without its banner
            text = " ".join(line.strip() for line in str(e.get("message")).splitlines() if line.strip(" *"))
            return ["[yellow]warning[/]: " + _esc(text)]
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

    def _hung(self, e: dict[str, Any]) -> list[str]:
        """One line per hang: every live rank is declared hung at once, the longest silent first."""
        run = self.run
        if run.hang_said == e.get("attempt"):
            return []
        run.hang_said = e.get("attempt")
        run.steps_before_failure = run.attempt_max_step
        limit = _seconds(e["timeout"]) if _is_number(e.get("timeout")) else "the hang limit"
        return [f"[bold red]group hung[/]: no rank showed progress within {limit}; "
                f"rank {e.get('rank')} silent longest ({_seconds(e.get('silent_for'))}"
                + (", none since its launch)" if e.get("before_first_step") else ")")]

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


def _diagnosis(e: dict[str, Any]) -> list[str]:
    """The summary, the laggards' innermost frames (every rank's when none lags), the ranks that
    gave no stack and why, and where the stack files are."""
    summary = str(e.get("summary") or "no summary")
    lines = [f"[bold red]hang diagnosed[/]: {_esc(summary)}"]
    frames = _by_rank(e.get("frames"))
    for rank, stack in frames[:RANKS_SHOWN]:
        lines += [f"  [dim]rank {rank} | {_esc(str(f))}[/]"
                  for f in (stack if isinstance(stack, list) else [])[:FRAMES_SHOWN]]
    if len(frames) > RANKS_SHOWN:
        lines.append(f"  [dim]... {len(frames) - RANKS_SHOWN} more ranks in the stack files[/]")
    why: dict[str, list[str]] = {}  # the ranks that gave no stack for the same reasons, together
    for rank, problems in _by_rank(e.get("unanswered")):
        problems = problems if isinstance(problems, list) else [problems]
        text = "; ".join(dict.fromkeys(map(str, problems)))
        if text not in summary:  # the summary says why of a rank it could not place
            why.setdefault(text, []).append(rank)
    lines += [f"  [yellow]no stack from {_ranks(ranks)}[/]: {_esc(text)}"
              for text, ranks in list(why.items())[:RANKS_SHOWN]]
    return lines + ([where] if (where := _stacks(e, "  stacks: {}")) else [])


def _stacks(e: dict[str, Any], form: str) -> str:
    """Where a diagnosis's stack files are, or why not (the daemon's words); "" if unsaid."""
    if isinstance(e.get("stacks"), str):
        return form.format(_esc(e["stacks"]))
    if e.get("stacks_error"):
        return form.format(_esc(str(e["stacks_error"])))
    return ""


def _by_rank(by_rank: Any) -> list[tuple[str, Any]]:
    """A per-rank object's items in rank order (keys are ints on the bus, strings in JSON)."""
    if not isinstance(by_rank, dict):
        return []
    items = [(str(rank), value) for rank, value in by_rank.items()]
    return sorted(items, key=lambda kv: (0, int(kv[0]), "") if kv[0].isdigit() else (1, 0, kv[0]))


def _ranks(ranks: list[str]) -> str:
    """``rank 3`` or ``ranks 0-5, 7``: runs of consecutive ranks written as a range."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs: list[list[int]] = []
    for r in sorted(int(r) for r in ranks if r.isdigit()):
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return "ranks " + ", ".join(parts + [r for r in ranks if not r.isdigit()])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(value: Any) -> str:
    """93.1 s, 600.0 s, 0.0512 s: intervals under a second keep their digits."""
    if not _is_number(value):
        return "? s"
    return f"{value:.1f} s" if abs(value) >= 1 else f"{value:.3g} s"


def _fields(e: dict[str, Any]) -> str:
    skip = {"timestamp", "level", "event"}
    return " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)
