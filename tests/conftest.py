from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Awaitable
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """Start daemons in ``tmp_path``; all of them and their workers are killed afterwards."""
    started: list[Daemon] = []

    async def start(*args: str, command: list[str] | None = None, **options: Any) -> Daemon:
        d = await Daemon.start(tmp_path, *args, command=command, **options)
        started.append(d)
        return d

    yield start
    for d in started:
        await d.kill()
