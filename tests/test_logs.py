"""The logging pipeline: views observe every event through the bus, and a broken view is dropped."""

from __future__ import annotations

import io
import json

from supervisord_ft.logs import EventBus, make_logger


def test_subscribers_see_every_event_as_written_and_a_raising_view_is_dropped(capsys):
    bus, seen = EventBus(), []

    def broken(event):
        raise RuntimeError("view bug")

    bus.subscribe(seen.append)
    bus.subscribe(broken)
    events = io.StringIO()
    log = make_logger("json", events, stream=io.StringIO(), bus=bus).bind(rank=1)
    log.info("first", x=1)
    log.warning("second")
    written = [json.loads(line) for line in events.getvalue().splitlines()]
    assert seen == written
    assert [e["event"] for e in seen] == ["first", "second"] and seen[0]["rank"] == 1
    assert capsys.readouterr().err.count("dropped after it raised") == 1
