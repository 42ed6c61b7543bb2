"""Structured logging: one structlog pipeline that writes every event twice.

Each event is rendered to JSON once; that line goes to ``<run_dir>/events.jsonl`` (always JSON,
for ``tail -f | jq``) and, for the json format, to stdout as is. The console format renders the
same event for a human instead. Every event carries ``timestamp`` (ISO 8601, UTC), ``level`` and
``event`` first.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import structlog

Subscriber = Callable[[dict[str, Any]], None]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


class EventBus:
    """Where in-process views (console, metrics, sd_notify) observe every event the daemon logs.

    The loop only logs; views subscribe here instead of adding branches to the loop. A view
    receives each event as a dict (``timestamp``, ``level``, ``event`` and the fields) after it
    has been written. A view that raises is dropped and reported once on stderr: supervision
    never depends on a view.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.remove(subscriber)

    def publish(self, event: dict[str, Any]) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:  # a broken view must not take the loop down with it
                self._subscribers.remove(subscriber)
                print(f"supervisord-ft: view {subscriber!r} dropped after it raised {exc!r}",
                      file=sys.stderr)


class _Renderer:
    """Last processor: JSON-encodes the event, tees it to the events file, returns stdout's text."""

    def __init__(self, events: TextIO | None, console: bool, colors: bool,
                 bus: EventBus | None) -> None:
        self._events = events
        self._bus = bus
        self._console = structlog.dev.ConsoleRenderer(colors=colors) if console else None

    def __call__(self, _logger: Any, _name: str, ev: dict[str, Any]) -> str:
        ordered = {"timestamp": ev.pop("timestamp"), "level": ev.pop("level"), "event": ev.pop("event")}
        ordered.update(ev)
        line = _dumps(ordered)
        if self._events is not None:
            self._events.write(line + "\n")
            self._events.flush()
        if self._bus is not None:
            self._bus.publish(ordered)
        if self._console is not None:
            return self._console(_logger, _name, dict(ordered))
        return line


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` means console when the stream is a terminal (a person watching), else json."""
    if fmt != "auto":
        return fmt
    return "console" if stream.isatty() else "json"


def make_logger(fmt: str, events: TextIO | None, stream: TextIO = sys.stdout,
                bus: EventBus | None = None) -> Any:
    """A bound logger writing to ``stream`` in ``fmt`` and to ``events`` as JSON lines; every
    event is then published on ``bus``."""
    fmt = resolve_format(fmt, stream)
    return structlog.wrap_logger(
        structlog.WriteLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            _Renderer(events, console=fmt == "console", colors=stream.isatty(), bus=bus),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
