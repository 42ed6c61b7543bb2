"""JSON lines on raw file descriptors: the one wire format between the daemon and these helpers.

Raw ``os.read``/``os.write``, not ``sys.stdin``: a standby hands its stdin over to the script it
runs, so nothing may sit in a Python-level read buffer.
"""

from __future__ import annotations

import json
import os
from typing import Any


class Reader:
    """Reads ``fd`` one JSON line at a time; bytes past a line wait for the next call."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def read(self) -> dict[str, Any] | None:
        """The next line as a dict; None at EOF (the daemon is gone, or let this helper go)."""
        while b"\n" not in self._buffer:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def write(fd: int, **fields: Any) -> None:
    data = (json.dumps(fields) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]
