"""`supervisord-ft report`: the HTML holds the run's numbers and its own PNG; without matplotlib
it says so in one line."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness import FAKE_WORKER, cli
from test_e2e import COMMON, SIZES
from test_runlog import STACKS, SUMMARY, hang_run


class Tables(HTMLParser):
    """The text of every cell of the attempts table, row by row, and the image's source."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.img = ""
        self._in_table = self._in_cell = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "attempts":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")
        elif tag == "img":
            self.img = attrs["src"]

    def handle_endtag(self, tag):
        self._in_table &= tag != "table"
        self._in_cell &= tag not in ("td", "th")

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1] += data


async def report(run_dir: Path) -> tuple[list[dict[str, str]], Tables]:
    """Write the report of ``run_dir``; its attempts as dicts by column, and the parsed page."""
    rc, out, err = await cli("report", str(run_dir))
    assert (rc, err) == (0, "")
    html_path = Path(out.strip())
    assert html_path == run_dir / "report.html"
    page = Tables(html_path.read_text())
    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000  # a drawn plot, not a stub
    assert page.img == "data:image/png;base64," + base64.b64encode(png).decode()  # self-contained
    head, *rows = page.rows
    return [dict(zip(head, row)) for row in rows], page


async def test_the_report_of_a_crash_has_one_row_per_attempt_with_its_cause(daemon, tmp_path):
    d = await daemon("--restart-backoff", "0", command=[*FAKE_WORKER, "--steps", "40", "--step-time",
                                                        "0.02", "--fail-rank", "1", "--fail-at-step", "6"])
    assert await d.finish() == 0
    attempts, _ = await report(tmp_path / "run")
    assert [a["attempt"] for a in attempts] == ["0", "1"]
    assert attempts[0]["ended by"] == "rank 1 exited with 1: rank 1 failing at step 6"
    assert attempts[0]["cause"] == "rank 1: exit_code: rank 1 failing at step 6"
    assert attempts[0]["recovery phases"].startswith("detection ") and attempts[1]["cause"] == ""
    # The fake's ranks do not step in lockstep: rank 0 may be a few steps further when torn down.
    assert int(attempts[0]["last step"]) >= 6
    assert attempts[0]["steps redone"] == attempts[0]["last step"]  # no checkpoint: all redone
    assert attempts[0]["resumed from step"] == attempts[1]["resumed from step"] == "fresh start"
    assert float(attempts[0]["detection (s)"]) < 0.5 and float(attempts[0]["downtime (s)"]) > 0
    assert attempts[1]["ended by"] == "DONE" and attempts[1]["last step"] == "40"


class Diagnoses(HTMLParser):
    """Each diagnosis section's heading and its facts, ``dt`` -> ``dd`` text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, str]] = {}
        self._heading: str | None = None
        self._tag = self._dt = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "section" and dict(attrs).get("class") == "diagnosis":
            self._heading = ""
        self._tag = tag

    def handle_endtag(self, tag):
        self._tag = ""
        if tag == "section":
            self._heading = None

    def handle_data(self, data):
        if self._heading is None:
            return
        if self._tag == "h3":
            self._heading += data
            self.sections[self._heading] = {}
        elif self._tag == "dt":
            self._dt = data
        elif self._tag in ("dd", "pre"):
            facts = self.sections[self._heading]
            facts[self._dt] = facts.get(self._dt, "") + data


async def test_the_report_of_a_hang_shows_its_diagnosis(tmp_path):
    (tmp_path / "events.jsonl").write_text("\n".join(hang_run(
        unanswered={"2": ["channel: no answer within 0.5 s", "py-spy: not installed"]})) + "\n")
    attempts, _ = await report(tmp_path)
    assert attempts[0]["ended by"] == "rank 1 hung: no sign of progress for 94.5 s"
    sections = Diagnoses((tmp_path / "report.html").read_text()).sections
    assert list(sections) == ["attempt 0: hang"]
    assert sections["attempt 0: hang"] == {
        "summary": SUMMARY, "laggards": "rank 1", "stacks": STACKS,
        "rank 2 gave no stack": "channel: no answer within 0.5 s; py-spy: not installed",
        "rank 1, innermost first": "job.py:7 in spin_forever\njob.py:13 in <module>"}


async def test_without_matplotlib_report_exits_2_with_one_line(tmp_path):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text(json.dumps(
        {"timestamp": "2026-01-01T00:00:00Z", "level": "info", "event": "supervisor_start"}) + "\n")
    rc, out, err = await cli("report", str(run_dir),
                             env={"PYTHONPATH": f"{shadow.parent}:{Path(__file__).parent.parent}"})
    assert (rc, out) == (2, "")
    assert err == "supervisord-ft: error: report needs matplotlib: " \
                  "pip install 'supervisord-ft[report]'\n"
    assert not (run_dir / "report.html").exists()


@pytest.mark.e2e
async def test_the_report_of_a_real_crash_and_recovery_holds_its_numbers(daemon, tmp_path):
    # The demo in small: 60 steps, a checkpoint every 5; rank 1 dies after step 23. No
    # just-in-time save, so that the recovery redoes steps for the report to count.
    d = await daemon(*COMMON, *SIZES, "--crash-at-step", "23", "--crash-rank", "1", "--jit-checkpoint-timeout", "0")
    assert await d.finish(timeout=120) == 0
    attempts, _ = await report(tmp_path / "run")
    first, second = attempts
    assert first["ended by"] == "rank 1 exited with 1" and first["last step"] == "23"
    assert first["cause"].startswith("rank 1: exit_code: exited with 1")  # the built-in job's injected crash
    assert second["resumed from step"] == "20 (checkpoint_step_20.pt)"
    assert first["steps redone"] == "3"  # crash step - checkpoint step
    assert second["ended by"] == "DONE" and second["last step"] == "60"
    assert float(first["teardown (s)"]) < 5 and float(first["downtime (s)"]) > 0
    text = (tmp_path / "run" / "report.html").read_text()
    goodput = re.search(r"(\d+) useful steps in ([\d.]+) s = ([\d.]+) steps/s, (\d+)% of the "
                        r"fault-free ([\d.]+) steps/s", text)
    assert goodput is not None and goodput[1] == "60"
    assert 0 < int(goodput[4]) < 100

    rc, out, _ = await cli("status", str(tmp_path / "run"), "--json")
    status = json.loads(out)
    assert (rc, status["state"], status["step"], status["total_steps"]) == (0, "DONE", 60, 60)
    assert [a["resumed_step"] for a in status["attempts"]] == [0, 20]
    assert status["checkpoint"]["step"] == 60 and status["goodput"]["steps_redone"] == 3
