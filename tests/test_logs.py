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
