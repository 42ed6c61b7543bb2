"""``supervisord-ft report RUN_DIR``: one self-contained HTML page a person reads after a run.

A timeline (loss and step over wall time per rank, a band for each phase of each failure,
checkpoint markers) drawn with matplotlib's Agg backend, written as a PNG and embedded in the
HTML as a data URI; below it the attempts, the goodput, and the diagnoses (what the ranks were
doing when a hang was declared or a rank failed). Everything comes from :mod:`runlog`.
matplotlib is the optional ``report`` extra, imported only here and only when a report is
drawn, so the daemon's install stays small.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime
from pathlib import Path
from typing import Any

from . import runlog
from .errors import ReaderError

HTML = "report.html"
# The phases of a failure, in order (label, colour); see _phases for their bounds.
PHASES = (("failure → detection", "#d62728"), ("teardown", "#ff7f0e"),
          ("checkpoint choice, backoff", "#9467bd"))
STARTUP = ("launch → first step", "#7f7f7f")
RANK_COLOURS = ("#1f77b4", "#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReaderError("report needs matplotlib: pip install 'supervisord-ft[report]'") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    return plt


def _phases(a: runlog.Attempt) -> list[tuple[str, str, float, float]]:
    """(label, colour, start, end) of each phase of ``a``'s failure that the log dates."""
    marks = [a.failed_at, a.detected_at, a.teardown_done_at, a.relaunched_at]
    return [(label, colour, lo, hi) for (label, colour), lo, hi in zip(PHASES, marks, marks[1:])
            if lo is not None and hi is not None]


def timeline(run: runlog.Run) -> bytes:
    """The timeline as PNG bytes."""
    plt = _pyplot()
    fig, (loss_ax, step_ax) = plt.subplots(2, 1, sharex=True, figsize=(11, 6.6), dpi=110,
                                           height_ratios=(2, 3), layout="constrained")
    for rank, points in sorted(run.series.items()):
        colour = RANK_COLOURS[rank % len(RANK_COLOURS)]
        style = "-" if rank == 0 else (0, (4, 3))  # ranks often report the same: tell them apart
        for n, stretch in enumerate(runlog.stretches(points)):  # no line across a relaunch
            label = f"rank {rank}" if n == 0 else None
            losses = [(p.t, p.loss) for p in stretch if p.loss is not None]
            if losses:
                loss_ax.plot(*zip(*losses), lw=0.8, ls=style, color=colour, alpha=0.8, label=label)
            step_ax.plot([p.t for p in stretch], [p.step for p in stretch], lw=1.4, ls=style,
                         color=colour, label=label)
    bands = [(*STARTUP, a.launched_at, a.first_step_at) for a in run.attempts
             if a.first_step_at is not None]
    bands += [phase for a in run.attempts for phase in _phases(a)]
    labelled = set()
    for label, colour, lo, hi in bands:
        for ax in (loss_ax, step_ax):
            # A phase of a millisecond still shows: at least a hairline.
            ax.axvspan(lo, max(hi, lo + 0.002 * _span(run)), color=colour, alpha=0.22, lw=0,
                       label=label if ax is step_ax and label not in labelled else None)
        labelled.add(label)
    failed = [a for a in run.attempts if a.failed_at is not None]
    for a in failed:
        for ax in (loss_ax, step_ax):
            ax.axvline(a.failed_at, color="#d62728", lw=1)
        step_ax.annotate(f"attempt {a.id}: {a.cause or 'failed'}", (a.failed_at, 1.0),
                         xycoords=("data", "axes fraction"), xytext=(4, -4),
                         textcoords="offset points", va="top", fontsize=8, color="#d62728")
    if saved := [c.t for c in run.checkpoints if c.step is not None]:
        # A rug along the time axis: checkpoints are often too dense to mark on the curve.
        step_ax.plot(saved, [0.015] * len(saved), ls="none", marker="|", ms=9, color="#2ca02c",
                     transform=step_ax.get_xaxis_transform(), label="checkpoint saved")
    if resumed := [(b.launched_at, b.resumed_step) for b in run.attempts if b.resumed_from]:
        step_ax.plot(*zip(*resumed), ls="none", marker="o", ms=7, mfc="white", mew=1.5,
                     color="black", label="launch resuming from a checkpoint")
        for t, step in resumed:
            step_ax.annotate(f"resumed from {step}", (t, step), xytext=(6, -12),
                             textcoords="offset points", fontsize=8)
    loss_ax.set_ylabel("loss")
    step_ax.set_ylabel("global step")
    step_ax.set_xlabel(f"seconds since {run.started[:19].replace('T', ' ')} UTC")
    step_ax.set_xlim(0, _span(run))
    step_ax.set_ylim(bottom=0)
    loss_ax.set_title(f"run {run.run_id}: {run.state}, restarts: {run.restarts}", loc="left")
    for ax in (loss_ax, step_ax):
        ax.grid(True, alpha=0.3)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(loc="upper left", fontsize=8)
    else:
        loss_ax.text(0.5, 0.5, "no rank reported a loss", transform=loss_ax.transAxes,
                     ha="center", va="center", color="#777")
    step_ax.legend(loc="upper left", fontsize=8)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def _span(run: runlog.Run) -> float:
    ends = [p.t for points in run.series.values() for p in points[-1:]]
    ends += [a.launched_at for a in run.attempts] + [run.goodput.wall_seconds if run.goodput else 0]
    return max(ends + [1.0])


# -- the page -----------------------------------------------------------------------------------
def _s(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.3f}"


def _attempt_rows(run: runlog.Run) -> list[list[str]]:
    rows = []
    for a in run.attempts:
        resumed = f"{a.resumed_step} ({Path(a.resumed_from).name})" if a.resumed_from \
            else "fresh start"
        ended = a.cause or (run.state if a is run.attempts[-1] else "")
        detection = None if a.detected_at is None or a.failed_at is None \
            else a.detected_at - a.failed_at
        rows.append([str(a.id), _s(a.launched_at), resumed,
                     "" if a.last_step is None else str(a.last_step), str(ended),
                     a.explained.text() if a.explained else "",
                     _s(detection), _s(a.teardown_seconds), _s(a.relaunched_at), _s(a.downtime),
                     "" if a.steps_redone is None else str(a.steps_redone),
                     runlog.phases_text(a.phases) if a.phases else ""])
    return rows


def _diagnoses(run: runlog.Run) -> str:
    """A section per diagnosed attempt: the summary, the laggards, each shown rank's innermost
    frames, the ranks that gave no stack, and where the stack files are."""
    parts = []
    for a in run.attempts:
        if (d := a.diagnosis) is None:
            continue
        what = "hang" if d.kind == "hang" else f"survivors of rank {a.failed_rank}'s failure"
        facts = [("summary", d.summary or ""), ("laggards", runlog.laggards_text(d)),
                 ("stacks", runlog.stacks_text(d))]
        facts += [(f"rank {r} gave no stack", "; ".join(problems))
                  for r, problems in d.unanswered.items()]
        dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
        frames = "".join(f"<dt>rank {html.escape(r)}, innermost first</dt><dd><pre>"
                         + html.escape("\n".join(f)) + "</pre></dd>" for r, f in d.frames.items())
        parts.append(f'<section class="diagnosis" id="diagnosis-{a.id}"><h3>attempt {a.id}: '
                     f"{html.escape(what)}</h3><dl>{dl}{frames}</dl></section>")
    note = ('<p class="note">Asked of every live rank before any signal. The stack files hold '
            "every thread of every rank and its last collectives.</p>")
    return "<h2>Diagnoses</h2>" + note + "".join(parts) if parts else ""


ATTEMPT_COLUMNS = ("attempt", "launched (s)", "resumed from step", "last step", "ended by",
                   "cause", "detection (s)", "teardown (s)", "relaunched (s)", "downtime (s)",
                   "steps redone", "recovery phases")


def page(run: runlog.Run, png: bytes) -> str:
    """The report's HTML: one file, the PNG inside it."""
    g = run.goodput
    facts = [("state", f"{run.state}" + (f" (exit {run.exit_code})" if run.exit_code is not None
                                         else f", daemon {run.daemon}")),
             ("step", f"{run.step}" + (f" / {run.total_steps}" if run.total_steps else "")),
             ("restarts", f"{run.restarts} ({len(run.attempts)} attempts)")]
    if g is not None:
        goodput = f"{g.useful_steps} useful steps in {g.wall_seconds:.1f} s = " \
                  f"{_rate(g.steps_per_second)}"
        if g.ratio is not None:
            goodput += f", {g.ratio:.0%} of the fault-free {_rate(g.fault_free_steps_per_second)}"
        facts += [("wall time", f"{g.wall_seconds:.1f} s"), ("goodput", goodput),
                  ("time not stepping", f"start-up {_s(g.startup_seconds)} s, downtime "
                                        f"{_s(g.downtime_seconds)} s; {g.steps_redone} steps "
                                        "redone")]
    if (f := run.last_failure) is not None:
        facts.append(("last failure", runlog.failure_text(f)))
    if (ck := run.checkpoint) is not None:
        facts.append(("newest checkpoint", f"step {ck.step}: {ck.path}"))
    if run.skipped_lines:
        facts.append(("unreadable lines", f"{run.skipped_lines} skipped"))
    head = "".join(f"<th>{c}</th>" for c in ATTEMPT_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in _attempt_rows(run))
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return TEMPLATE.format(title=html.escape(f"supervisord-ft run {run.run_id}"), facts=dl,
                           img=uri, head=head, body=body, diagnoses=_diagnoses(run),
                           source=html.escape(run.path),
                           generated=f"{datetime.now():%Y-%m-%d %H:%M}")


def _rate(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.1f} steps/s"


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
* {{ box-sizing: border-box; }}
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1240px;
       padding: 0 16px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 12px; }}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0 0 16px; }}
dt {{ font-weight: 600; }} dd {{ margin: 0; overflow-wrap: anywhere; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 12px 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:nth-child(3), td:nth-child(5) {{ text-align: left; }}
p.note {{ color: #555; max-width: 900px; }}
section.diagnosis pre {{ margin: 0; font-size: 13px; white-space: pre-wrap; }}
</style></head><body>
<h1>{title}</h1>
<dl>{facts}</dl>
<img alt="timeline: loss and step per rank over wall time, failures and checkpoints" src="{img}">
<h2>Attempts</h2>
<table id="attempts"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p class="note">Times are seconds since the run's first event. Detection: from the failure (the
failing exit, or a hung rank's last output) to the loop's transition to RECOVERING. Downtime: from
the failure to the next attempt's first step. Steps redone: the failed attempt's highest step minus
the step the next attempt resumed from. Cause: the failure's explained root cause (docs/recovery.md, "Why an
attempt failed"). Recovery phases: where the time from the failure to the next attempt's first
progress went, as the daemon measured it. Goodput: useful steps (final step minus the step the run
started from) per second of wall time (first launch to last event), against the fault-free rate,
the median over every rank's attempts of the steps per second between their first and last step
report; the ratio counts start-up, downtime and redone steps as lost.</p>
{diagnoses}
<p class="note">From {source}, written {generated} by supervisord-ft report.</p>
</body></html>
"""


def main(run_dir: Path, run_id: str | None, output: Path | None) -> int:
    run = runlog.summarise(runlog.read(run_dir), run_id)
    png = timeline(run)
    html_path = output or run_dir / HTML
    png_path = html_path.with_suffix(".png")
    try:
        png_path.write_bytes(png)
        html_path.write_text(page(run, png), encoding="utf-8")
    except OSError as exc:
        raise ReaderError(f"{exc.filename}: cannot write the report: {exc.strerror}") from None
    print(html_path)
    return 0
