"""Per-rank log files in torchrun's layout (``log_dir``, ``redirects``, ``tee``), never on the
training's path.

torchrun (``DefaultLogsSpecs``) makes a job folder ``<run id>_<random>`` under ``--log-dir`` and
in it, per launch, ``attempt_<restart count>/<local rank>/`` with ``stdout.log`` and
``stderr.log`` for the streams ``--redirects`` or ``--tee`` name, and ``error.json`` (the rank's
``TORCHELASTIC_ERROR_FILE``). A redirected stream is kept off the console, a teed one goes there
too, and ``--local-ranks-filter`` keeps the other local ranks off it. Here the console is the
daemon's stdout (JSON events or the console view); ``events.jsonl`` stays the record of every
line, which supervision (liveness, tracebacks, causes) and the offline readers depend on.

Where this differs from torchrun, deliberately:

- A relaunch that spends no restart (a new multi-node round) appends to the folder of its
  restart count; torchrun deletes that folder first.
- A folder or file that cannot be made or written (a full disk, no permission) is said once per
  attempt (``rank_logs_failed``) and its output is dropped; supervision goes on.

As torchrun's (it hands the rank the file itself), a file holds the bytes the rank wrote, as they
were read from its pipe: before they are cut into lines, so a progress bar's every redraw and a
line of any length are there, and lines a flood costs the events (``worker_output_dropped``) are
not lost from it. A chunk costs the loop a list append (measured: a per-line hand-over slowed the
pipes' reading enough to block a flooding rank); once per turn of the loop what was read goes to
one writer thread through a queue bounded in bytes (a stalled file system holds that thread only;
output past the bound is dropped and said), which writes each file's share in one system call,
whole or not at all (:class:`.writer.LineFile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import blocking
from .logs import EVENTS_BUFFER_BYTES
from .rendezvous import RankInfo
from .stdio import EXIT_DRAIN_TIMEOUT
from .writer import LineFile, WriterThread, append_only

if TYPE_CHECKING:
    from .config import Config

STD = {"stdout": 1, "stderr": 2}  # torchrun's ``Std`` flags: 0 none, 1, 2, 3 both
ERROR_FILE = "error.json"
# Seconds an attempt's folders may take to be made (milliseconds, normally); past it the attempt
# launches without files: a stalled file system must not hold the launch.
FOLDERS_WAIT = 1.0
BUFFER_BYTES = EVENTS_BUFFER_BYTES  # output waiting for a stalled file system before it is lost


def parse_std(value: str) -> int | dict[int, int]:
    """torchrun's ``Std.from_str``: ``0``-``3`` for every local rank, or per local rank as
    ``0:1,1:2`` (the ranks left out: 0); ValueError for anything else."""
    if re.fullmatch(r"[0-3]", value):
        return int(value)
    if re.fullmatch(r"\d+:[0-3](,\d+:[0-3])*", value):
        return {int(r): int(s) for r, s in (item.split(":") for item in value.split(","))}
    raise ValueError(value)


@dataclass(frozen=True)
class Routing:
    """Where one local rank's streams go: to files, and on the daemon's stdout."""

    to_file: frozenset[str]
    shown: frozenset[str]

    @classmethod
    def of(cls, cfg: Config, local_rank: int) -> Routing:
        """As torchrun routes them: a stream both redirected and teed is teed."""
        redirected, teed = (_flags(v, local_rank) for v in (cfg.redirects, cfg.tee))
        kept = cfg.local_ranks_filter is None or local_rank in {
            int(r) for r in cfg.local_ranks_filter.split(",")}
        return cls(frozenset(s for s, f in STD.items() if (redirected | teed) & f),
                   frozenset(s for s, f in STD.items() if kept and (teed & f or not redirected & f)))


def _flags(value: str, local_rank: int) -> int:
    std = parse_std(value)
    return std.get(local_rank, 0) if isinstance(std, dict) else std


@dataclass(eq=False)
class _File:
    """One stream's file; opened, written and closed by the writer thread only."""

    path: Path
    owner: AttemptLogs
    out: LineFile | None = None
    failed: bool = False  # by the thread: everything later for it is dropped


class _Writer(WriterThread):
    """The thread that owns every file's descriptor, and the bounded queue that feeds it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__("rank-logs-writer")
        self.max_bytes = max_bytes
        self._loop = asyncio.get_running_loop()
        self._pending: dict[_File, list[bytes]] = {}  # the loop's, until its turn ends
        self._pending_bytes = 0
        self._queue: list[tuple[_File, bytes | None]] = []  # None: close it
        self._queued = 0  # bytes queued or being written
        self._thread.start()

    def put(self, file: _File, data: bytes) -> None:
        """Buffer ``data`` for ``file``; past the bound it is dropped, and said."""
        if self._queued + self._pending_bytes + len(data) > self.max_bytes:
            file.owner.failed(file.path, f"no write completed while {self.max_bytes >> 20} MiB "
                                         f"of output waited (a stalled file system)")
            return
        if not self._pending:
            self._loop.call_soon(self.hand_over)
        self._pending.setdefault(file, []).append(data)
        self._pending_bytes += len(data)

    def hand_over(self, then: Sequence[tuple[_File, bytes | None]] = ()) -> None:
        """Queue what is buffered for the thread, then ``then``: ``(file, b"")`` opens it (the
        file exists, lines or not), ``(file, None)`` closes it."""
        with self._cond:
            self._queue += ((f, b"".join(chunks)) for f, chunks in self._pending.items())
            self._queue += then
            self._queued += self._pending_bytes
            self._cond.notify()
        self._pending.clear()
        self._pending_bytes = 0

    def close(self, timeout: float = EXIT_DRAIN_TIMEOUT) -> None:
        """Let the thread write what is queued, for up to ``timeout``; then stop it."""
        self.hand_over()
        self._stop(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wait():
                    return
                batch, self._queue = self._queue, []
            for file, data in _coalesced(batch):
                if (error := _write(file, data)) is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                        self._loop.call_soon_threadsafe(file.owner.failed, file.path, error)
            with self._cond:
                self._queued -= sum(len(data) for _, data in batch if data)


def _coalesced(batch: list[tuple[_File, bytes | None]]) -> list[tuple[_File, bytes | None]]:
    """Each file's data joined (one write per file, not one per turn of the loop: each write
    hands the GIL over), then the closes (no file is written after its close)."""
    data: dict[_File, list[bytes]] = {}
    for file, item in batch:
        if item is not None:
            data.setdefault(file, []).append(item)
    return [(f, b"".join(parts)) for f, parts in data.items()] + [(f, d) for f, d in batch if d is None]


def _write(file: _File, data: bytes | None) -> str | None:
    """(In the thread.) Open ``file`` on its first data, write or close it; why it failed."""
    if data is None:
        if file.out is not None:
            with contextlib.suppress(OSError):
                os.close(file.out.fd)
        return None
    if file.failed:
        return None
    error: OSError | None
    try:
        if file.out is None:
            file.out = LineFile(append_only(file.path))
        error = file.out.write(data) if data else None
    except OSError as exc:
        error = exc
    if error is None:
        return None
    file.failed = True
    return error.strerror or str(error)


class AttemptLogs:
    """One attempt's folder and files: :meth:`write` from the loop, :meth:`close` at teardown."""

    def __init__(self, writer: _Writer, folder: Path, ranks: Sequence[RankInfo],
                 routes: dict[int, Routing], log: Any) -> None:
        self.folder = folder
        self._writer = writer
        self._log = log
        self._said = False
        self._local = {r.rank: r.local_rank for r in ranks}
        self._files = {(r.rank, s): _File(folder / str(r.local_rank) / f"{s}.log", self)
                       for r in ranks for s in sorted(routes[r.local_rank].to_file)}
        writer.hand_over([(file, b"") for file in self._files.values()])
        self._closed = False

    def error_file(self, rank: int) -> Path:
        """The rank's ``TORCHELASTIC_ERROR_FILE``, where torchrun puts it."""
        return self.folder / str(self._local[rank]) / ERROR_FILE

    def write(self, rank: int, stream: str, data: bytes) -> None:
        """``data``, as read from the rank's ``stream``, for its file (if the stream has one)."""
        if not self._closed and (file := self._files.get((rank, stream))) is not None:
            self._writer.put(file, data)

    def close(self) -> None:
        """The attempt's workers are gone: its files are closed once what they got is written."""
        if not self._closed:
            self._closed = True
            self._writer.hand_over([(file, None) for file in self._files.values()])

    def failed(self, path: Path, reason: str) -> None:
        """Said once per attempt; the output for that file is dropped from then on."""
        if not self._said:
            self._said = True
            self._log.warning("rank_logs_failed", path=str(path), reason=reason)


@dataclass
class RankLogs:
    """The run's log folder: its job folder is made at the first launch, one per daemon run."""

    cfg: Config
    job_id: str  # the workers' TORCHELASTIC_RUN_ID, the job folder's prefix as in torchrun
    max_bytes: int = BUFFER_BYTES
    job: Path | None = field(default=None, init=False)  # <log_dir>/<job_id>_<random>, once made
    _writer: _Writer | None = field(default=None, init=False, repr=False)
    _last: AttemptLogs | None = field(default=None, init=False, repr=False)  # the latest attempt's files

    async def open(self, restart: int, ranks: Sequence[RankInfo], log: Any) -> AttemptLogs | None:
        """Make ``attempt_<restart>/<local rank>/`` (bounded by FOLDERS_WAIT, off the loop); None,
        said on ``log``, when it cannot be: the attempt then runs without files."""
        assert self.cfg.log_dir is not None
        root = self.cfg.log_dir

        def make() -> Path:
            if self.job is None:
                root.mkdir(parents=True, exist_ok=True)
                self.job = Path(tempfile.mkdtemp(prefix=f"{self.job_id}_", dir=root)).resolve()
            folder = self.job / f"attempt_{restart}"
            for rank in ranks:
                (folder / str(rank.local_rank)).mkdir(parents=True, exist_ok=True)
            return folder
        try:
            async with asyncio.timeout(FOLDERS_WAIT):
                folder = await blocking.in_thread(make, "rank-log-folders")
        except (OSError, TimeoutError) as exc:
            log.warning("rank_logs_failed", path=str(self.job or root),
                        reason=getattr(exc, "strerror", None) or str(exc)
                        or f"folders not made within {FOLDERS_WAIT:g} s")
            return None
        if self._writer is None:
            self._writer = _Writer(self.max_bytes)
        routes = {r.local_rank: Routing.of(self.cfg, r.local_rank) for r in ranks}
        self._last = AttemptLogs(self._writer, folder, ranks, routes, log)
        return self._last

    def close(self) -> None:
        """At the daemon's exit (the latest attempt's files may still be open: a run that ends
        DONE is not torn down): what is queued is written, for a bounded time."""
        if self._last is not None:
            self._last.close()
        if self._writer is not None:
            self._writer.close()
