"""The one reader of ``/proc``: what the kernel says about a process, by pid.

Torch-free, used by the daemon, the built-in worker, the tests and the benchmarks alike. A
process can vanish between any two reads, so every reader answers None (or an empty result)
for a process that is gone instead of raising.
"""

from __future__ import annotations

import functools
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")  # the unit of start and CPU times in /proc/<pid>/stat


@dataclass(frozen=True)
class Stat:
    """Fields of ``/proc/<pid>/stat`` (proc(5) numbers them from 1; ``comm`` is field 2)."""

    pid: int
    state: str        # 3: R, S, D, Z, ...
    ppid: int         # 4
    pgid: int         # 5
    sid: int          # 6: the session
    cpu_ticks: int    # 14 + 15: user + system time of the process itself
    start_ticks: int  # 22: clock ticks after boot (CLOCK_BOOTTIME) when it was created

    @property
    def zombie(self) -> bool:
        return self.state == "Z"


def stat(pid: int | str = "self") -> Stat | None:
    """The process's stat line, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            line = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The name (field 2) is in parentheses and may itself contain ") ": split at the last one.
    f = line.rpartition(")")[2].split()  # f[0] is field 3
    return Stat(int(line.split(" ", 1)[0]), f[0], int(f[1]), int(f[2]), int(f[3]),
                int(f[11]) + int(f[12]), int(f[19]))


def alive(pid: int) -> bool:
    """True for a process that runs code; a zombie (exited, not yet reaped) counts as dead."""
    st = stat(pid)
    return st is not None and not st.zombie


CAP_SYS_NICE = 23  # capabilities(7)


def can_leave_idle_priority() -> bool:
    """Whether a process of ours may go back from SCHED_IDLE to normal scheduling: with
    CAP_SYS_NICE, or an RLIMIT_NICE that allows nice 0 (sched(7)); else only the way in is open."""
    caps = status_field("self", "CapEff")
    if caps is not None and int(caps, 16) >> CAP_SYS_NICE & 1:
        return True
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return soft == resource.RLIM_INFINITY or soft >= 20


def processes() -> Iterator[Stat]:
    """Every process on the machine (in this pid namespace), zombies included."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := stat(entry.name)) is not None:
            yield st


def children(pid: int) -> list[Stat]:
    """The direct children of ``pid``, zombies included (/proc has no index: one scan)."""
    return [st for st in processes() if st.ppid == pid]


def status_field(pid: int | str, name: str) -> str | None:
    """One ``Name:\\tvalue`` field of ``/proc/<pid>/status``; None when gone or absent."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key == name:
                    return value.strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def caught_signals(pid: int | str) -> set[int] | None:
    """Signals the process has a handler for (``SigCgt``); None when it is gone.

    Signal n is bit n-1 of the hex mask. A signal whose default action is to terminate must
    only be forwarded to a process in this set.
    """
    mask = status_field(pid, "SigCgt")
    if mask is None:
        return None
    bits = int(mask, 16)
    return {n for n in range(1, bits.bit_length() + 1) if bits >> (n - 1) & 1}


def io_chars(pid: int | str) -> int | None:
    """Bytes the process has read and written through any descriptor (``rchar`` + ``wchar`` of
    ``/proc/<pid>/io``: files, pipes and sockets alike); None when gone or not readable."""
    try:
        with open(f"/proc/{pid}/io") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def memory_cgroup(pid: int | str) -> str | None:
    """The directory of the memory cgroup ``pid`` is in (cgroup v1's memory hierarchy, or v2's
    unified one), where its OOM kills are counted; None when gone or not found."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = path
        elif hierarchy == "0":
            v2 = path
    mounts = _cgroup_mounts()
    for kind, path in (("memory", v1), ("", v2)):
        if path is not None and kind in mounts:
            mountpoint, root = mounts[kind]
            relative = path[len(root):] if root != "/" and path.startswith(root) else path
            folder = os.path.join(mountpoint, relative.lstrip("/"))
            if os.path.isdir(folder):
                return folder
    return None


def oom_kills(cgroup: str) -> int | None:
    """How many of the cgroup's processes the kernel's OOM killer has killed (v2
    ``memory.events``, v1 ``memory.oom_control``); None where it does not say."""
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(cgroup, name)) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


@functools.cache
def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """Where the cgroup hierarchies are mounted: ``memory`` (v1) and ``""`` (v2), each as
    (mount point, the cgroup path it shows as its root)."""
    mounts: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            mounts.setdefault("", (fields[4], fields[3]))
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            mounts.setdefault("memory", (fields[4], fields[3]))
    return mounts
