"""The daemon's side of the per-rank channel (torch's side: ``supervisord_ft_standby/channel.py``).

Each Python rank serves torch's worker server on a Unix socket in a directory of this daemon's
own (mode 0700, under ``$TMPDIR``: a run dir can be too deep for ``AF_UNIX``'s 108 bytes); no
TCP port is opened. A cold rank opens it through the bootstrap on its ``PYTHONPATH``
(:func:`cold_env`), a warm one through the standby runner. A request is one HTTP/1.1 POST per
connection, bounded in time and in size: a rank that is gone, mid-answer, silent or garbled
costs at most the bound and gives a :class:`ChannelError` that says what was not got.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .envvars import CHANNEL, FAST_EXIT
from .errors import ConfigError

BOOT_DIR = Path(__file__).resolve().parent.parent / "supervisord_ft_standby" / "boot"
SAVED_PYTHONPATH = "SUPERVISORD_FT_PYTHONPATH"  # the job's own value, put back by the bootstrap
# torch's flight recorder keeps this many collectives per process group when the job sets no
# size of its own: enough to see who is behind; each entry is about 480 bytes of JSON.
FR_BUFFER = "TORCH_FR_BUFFER_SIZE"
FR_ENTRIES = "20"
MAX_ANSWER = 4 << 20  # a stack dump of thousands of threads fits; beyond it is cut and said
AF_UNIX_MAX = 107  # sun_path holds 108 bytes, the last a NUL
# Beside a rank's socket, the list of modules it imported (supervisord_ft_standby.channel.MODULES).
MODULES = ".modules"
NO_SOCKET = "no socket (the rank has not imported torch.distributed, or is not a Python rank)"
EXIT_ASK_TIMEOUT = 0.5  # the server answers a ping in milliseconds, even while Python spins


class ChannelError(Exception):
    """What could not be got from a rank, in a few words (``no socket``, ``no answer in 0.5 s``);
    ``status``: the HTTP status of an answer that was not 200."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    body: bytes
    truncated: bool  # the rank said more than MAX_ANSWER; ``body`` is its first part


class Sockets:
    """The directory of one daemon's channel sockets: one per rank and attempt."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sft-"))
        longest = self.path(10**6, 10**6)
        if len(os.fsencode(longest)) > AF_UNIX_MAX:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise ConfigError(f"TMPDIR {tempfile.gettempdir()!r} is too deep for a Unix socket "
                              f"path ({len(os.fsencode(longest))} > {AF_UNIX_MAX} bytes): "
                              "set a shorter TMPDIR or turn the channel off (--no-channel)")

    def path(self, attempt: int, rank: int) -> str:
        return str(self.dir / f"a{attempt}r{rank}.sock")

    def forget(self, attempt: int) -> None:
        """Remove one attempt's sockets (its ranks are gone; their servers never unlink them)."""
        for entry in os.scandir(self.dir):
            if entry.name.startswith(f"a{attempt}r"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def cold_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a cold start: the bootstrap (the channel, the fast exit) first on
    ``PYTHONPATH``, the job's value saved; unchanged if it has neither to do."""
    out = dict(env)
    if CHANNEL not in out and FAST_EXIT not in out:
        return out
    if "PYTHONPATH" in out:
        out[SAVED_PYTHONPATH] = out["PYTHONPATH"]
        out["PYTHONPATH"] = f"{BOOT_DIR}{os.pathsep}{out['PYTHONPATH']}"
    else:
        out["PYTHONPATH"] = str(BOOT_DIR)
    return out


async def ask(path: str, handler: str, timeout: float) -> Answer:
    """POST ``/handler/<handler>`` to the rank serving ``path``: its answer's body, or ChannelError."""
    if not os.path.exists(path):  # a stat, not a socket and a failed connect: 1,024 ranks are asked at once
        raise ChannelError(NO_SOCKET)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 16)
            writer.write(f"POST /handler/{handler} HTTP/1.1\r\nHost: rank\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status, length = _head(head)
            want = MAX_ANSWER if length is None else min(length, MAX_ANSWER)
            body = await _read_up_to(reader, want)
            if status != 200:
                raise ChannelError(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')!r}", status)
            truncated = (length or 0) > MAX_ANSWER or (length is None and len(body) == MAX_ANSWER)
            if length is not None and not truncated and len(body) < length:
                raise ChannelError(f"answer cut short ({len(body)} of {length} bytes)")
            return Answer(body, truncated)
    except FileNotFoundError:
        raise ChannelError(NO_SOCKET) from None
    except TimeoutError:
        raise ChannelError(f"no answer within {timeout:g} s") from None
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise ChannelError(f"{type(exc).__name__}: {exc}"[:200]) from None
    finally:
        if writer is not None:
            writer.close()


async def exiting(path: str) -> bool:
    """Whether the rank serving ``path`` is past torch's static destructors: its server still
    answers, but every handler is gone (404), so the interpreter is in its last steps of exit."""
    try:
        await ask(path, "ping", EXIT_ASK_TIMEOUT)
    except ChannelError as exc:
        return exc.status == 404
    return False


def _head(head: bytes) -> tuple[int, int | None]:
    """The status code and Content-Length of an HTTP response head (ValueError if it is none)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return int(parts[1]), length


async def _read_up_to(reader: asyncio.StreamReader, n: int) -> bytes:
    chunks, got = [], 0
    while got < n and (chunk := await reader.read(min(1 << 16, n - got))):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
