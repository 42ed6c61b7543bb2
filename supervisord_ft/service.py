"""What service managers and monitors see: metrics and probes over HTTP, and sd_notify.

Both are views subscribed to the :class:`~supervisord_ft.logs.EventBus`; the loop knows
nothing of them. :class:`Service` is entered before any worker starts, so a metrics port that
cannot be had is a :class:`ConfigError` (exit 2) with nothing started. ``prometheus_client``
is imported only when metrics are asked for: its import (``http.server``, ``email``, ...)
costs about 12 MB of RSS and 0.2 s of start-up that a daemon without a metrics port need not pay.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .config import Config
from .httpd import Response, Server
from .logs import EventBus
from .sdnotify import Notifier

if TYPE_CHECKING:
    from .metrics import Metrics


class Service:
    def __init__(self, cfg: Config, bus: EventBus) -> None:
        self.cfg = cfg
        self.metrics: Metrics | None = None
        self.server: Server | None = None
        self.notifier = Notifier.from_env()
        self._watchdog: asyncio.Task[None] | None = None
        if cfg.metrics_port is not None:
            from .metrics import Metrics  # see the module docstring: only when asked for
            self.metrics = Metrics()
            bus.subscribe(self.metrics.observe)
            self.server = Server({"/metrics": self._metrics, "/healthz": self._healthz,
                                  "/readyz": self._readyz})
        if self.notifier is not None:
            bus.subscribe(self.notifier.observe)

    async def __aenter__(self) -> Service:
        if self.server is not None:
            await self.server.start("metrics", self.cfg.metrics_addr, self.cfg.metrics_port or 0)
        if self.notifier is not None:
            self._watchdog = asyncio.create_task(self.notifier.watchdog(), name="sd-watchdog")
        return self

    def announce(self, log: Any) -> None:
        """Log where the metrics are served (the port is the kernel's choice with 0)."""
        if self.server is not None:
            log.info("metrics_listening", addr=self.cfg.metrics_addr, port=self.server.port)

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.notifier is not None:
            self.notifier.close()
        if self.server is not None:
            await self.server.close()

    # -- routes ---------------------------------------------------------------------------------
    def _metrics(self) -> Response:
        assert self.metrics is not None
        return Response(200, self.metrics.exposition(), self.metrics.content_type)

    @staticmethod
    def _healthz() -> Response:
        return Response(200, b"ok\n")  # answered at all: the loop is alive

    def _readyz(self) -> Response:
        assert self.metrics is not None
        reason = self.metrics.unready_reason()
        return Response(200, b"ready\n") if reason is None else Response(503, reason.encode() + b"\n")
