from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Awaitable
from pathlib import Path
from typing import Any

import pytest

from harness import Cluster, Daemon


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """Start daemons in ``tmp_path`` (or, to run several at once, in ``tmp_path / within``); all
    of them and their workers are killed afterwards."""
    started: list[Daemon] = []

    async def start(*args: str, command: list[str] | None = None, within: str | None = None,
                    **options: Any) -> Daemon:
        workdir = tmp_path / within if within else tmp_path
        workdir.mkdir(exist_ok=True)
        d = await Daemon.start(workdir, *args, command=command, **options)
        started.append(d)
        return d

    yield start
    for d in started:
        await d.kill()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Cluster]]]:
    """Start multi-node jobs in ``tmp_path`` (see :class:`harness.Cluster`); ``start`` picks the
    nodes started at once (default: all). Every daemon and its workers are killed afterwards."""
    made: list[Cluster] = []

    async def make(count: int, *args: str, start: list[int] | None = None, **options: Any) -> Cluster:
        c = Cluster(tmp_path, count, args, **options)
        made.append(c)
        for n in range(count) if start is None else start:
            await c.start_node(n)
        return c

    yield make
    for c in made:
        await c.kill()
