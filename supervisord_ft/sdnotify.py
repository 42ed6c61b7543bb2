"""systemd's notify protocol (``Type=notify``): a view of the events, plus a watchdog timer.

The protocol is one datagram of ``KEY=value`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). The socket is
non-blocking and every send error is ignored: systemd being away must never block or fail a
run. ``READY=1`` is sent when the group first reaches RUNNING, ``STATUS=`` on every state
change and as steps advance (at most once a second), ``STOPPING=1`` when the daemon starts to
shut down. With ``WATCHDOG_USEC`` set (and ``WATCHDOG_PID`` ours or unset), ``WATCHDOG=1`` is
sent from a timer on the event loop every half period, so a frozen loop stops the pings and
systemd restarts the daemon.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from .fsm import State
from .output import worker_field
from .supervisor import STEP_EVENT

STATUS_INTERVAL = 1.0  # least seconds between two step-driven STATUS= updates
ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
SHUTTING_DOWN = {State.STOPPING.value, State.DONE.value, State.FAILED.value}


class Notifier:
    def __init__(self, address: str, watchdog_interval: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval
        self.clock = clock
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC)
        self._ready = self._stopping = False
        self._state = State.LAUNCHING.value
        self._attempt: int | None = None
        self._step: int | None = None
        self._status_at = -STATUS_INTERVAL

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd asked for, or None. The variables are removed from ``environ``
        (as libsystemd's ``unset_environment`` does), so workers neither see nor use them."""
        address, usec, pid = (environ.pop(k, None) for k in ENV_KEYS)
        if not address:
            return None
        interval = None
        if usec and usec.isdigit() and int(usec) > 0 and pid in (None, str(os.getpid())):
            interval = int(usec) / 2e6
        return cls(address, interval)

    def send(self, message: str) -> None:
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError:  # no listener, a full queue, a gone socket: systemd's problem, not the run's
            pass

    def close(self) -> None:
        self._sock.close()

    async def watchdog(self) -> None:
        """Ping every half ``WATCHDOG_USEC`` until cancelled; a timer, so only a live loop pings."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    # -- the view -------------------------------------------------------------------------------
    def observe(self, event: dict[str, Any]) -> None:
        """The :class:`EventBus` subscriber."""
        name = event["event"]
        if name == "state_changed":
            self._state = event["to"]
            self._attempt = event["attempt"]
            lines = [self._status()]
            if self._state == State.RUNNING.value and not self._ready:
                self._ready = True
                lines.insert(0, "READY=1")
            if self._state in SHUTTING_DOWN and not self._stopping:
                self._stopping = True
                lines.insert(0, "STOPPING=1")
            self.send("\n".join(lines))
        elif name == "launching":
            self._attempt = event["attempt"]
            self._step = None
        elif (name == "worker_output" and event.get("worker_event") == STEP_EVENT
              and event.get("attempt") == self._attempt):
            step = worker_field(event, "step")
            if isinstance(step, int) and (self._step is None or step > self._step):
                self._step = step
                if self.clock() - self._status_at >= STATUS_INTERVAL:
                    self.send(self._status())

    def _status(self) -> str:
        self._status_at = self.clock()
        parts = [self._state]
        if self._attempt is not None:
            parts.append(f"attempt {self._attempt}")
        if self._step is not None:
            parts.append(f"step {self._step}")
        return "STATUS=" + ", ".join(parts)
