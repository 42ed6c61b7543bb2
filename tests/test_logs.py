"""The logging pipeline: views observe every event through the bus, and a broken view is dropped."""

from __future__ import annotations

import json

from supervisord_ft.logs import EventBus, EventsFile, Log


def test_subscribers_see_every_event_as_written_and_a_raising_view_is_dropped(tmp_path, capsys):
    bus, seen = EventBus(), []

    def broken(event):
        raise RuntimeError("view bug")

    bus.subscribe(seen.append)
    bus.subscribe(broken)
    path = tmp_path / "events.jsonl"
    log = Log(EventsFile(path), bus=bus)
    log.logger.bind(rank=1).info("first", x=1)
    log.logger.warning("second")
    log.close()
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert seen == written
    assert [e["event"] for e in seen] == ["first", "second"] and seen[0]["rank"] == 1
    assert capsys.readouterr().err.count("dropped after it raised") == 1


def test_lines_lost_for_want_of_room_with_no_line_after_them_are_said_at_the_end(tmp_path):
    """A flood's last lines, lost to a full buffer with nothing logged after them, are still
    counted in the file: by a log_gap at its end (was: never said)."""
    events = EventsFile(tmp_path / "events.jsonl", max_bytes=10_000)
    for i in range(20_000):
        events.append(json.dumps({"event": "x", "i": i}) + "\n", f"t{i}")
    # The last: larger than the whole buffer, so lost however fast the writer is.
    events.append(json.dumps({"event": "x", "pad": "p" * 20_000}) + "\n", "last")
    assert events.drain() == 0
    events.close()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    gaps = [e for e in lines if e["event"] == "log_gap"]
    assert len(lines) - len(gaps) + sum(g["lines"] for g in gaps) == 20_001
    assert lines[-1]["event"] == "log_gap" and lines[-1]["last_lost"] == "last"
