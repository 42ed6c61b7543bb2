"""What a benchmark hands back: the machine it ran on, summaries of repeated samples, a table, a JSON file.

Every number in a table is a summary of repeated runs (median, min, max), and every ours/torchrun
ratio is taken pair by pair (run i of ours against run i of torchrun, which ran right after it)
before it is summarised, so slow drift of a shared 2-core machine cancels out of the ratio.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Enough to tell two result files apart: CPU, cores, memory, kernel, Python, torch, date."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int
    p99: float | None = None  # only where many samples make it meaningful

    @classmethod
    def of(cls, samples: Sequence[float], p99: bool = False) -> Summary:
        xs = sorted(x for x in samples if x is not None and math.isfinite(x))
        if not xs:
            return cls(math.nan, math.nan, math.nan, 0)
        tail = xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)] if p99 else None
        return cls(statistics.median(xs), xs[0], xs[-1], len(xs), tail)

    def fmt(self, unit: str = "", digits: int = 3) -> str:
        if not self.n:
            return "n/a"
        if self.n == 1:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} [{self.min:.{digits}f}–{self.max:.{digits}f}]"


def ratios(ours: Sequence[float], theirs: Sequence[float]) -> Summary:
    """ours[i] / theirs[i] for each pair, summarised."""
    return Summary.of([a / b for a, b in zip(ours, theirs) if b])


def row(ours: Sequence[float], these: Sequence[float], is_ours: bool) -> tuple[Summary, Summary | None]:
    """One launcher's cell: its samples summarised, and ours/its per pair (None for ours itself)."""
    return Summary.of(these), None if is_ours else ratios(ours, these)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [max(len(r[i]) for r in [self.columns, *self.rows]) for i in range(len(self.columns))]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out = [f"\n### {self.title}\n", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        out += [f"\n{n}" for n in self.notes]
        return "\n".join(out)


@dataclass
class Result:
    """One benchmark's output: tables for people, ``data`` (raw samples and summaries) for the file."""

    name: str
    tables: list[Table]
    data: dict[str, Any]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Summary):
        return {k: v for k, v in asdict(value).items() if v is not None}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save(result: Result, info: dict[str, Any], quick: bool, seconds: float) -> Path:
    """Write ``results/<name>.json`` (quick runs: ``results/quick/``, never committed) atomically:
    a half-written file never replaces a good one."""
    directory = RESULTS / "quick" if quick else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.name}.json"
    tmp = path.with_suffix(".tmp")
    payload = {
        "benchmark": result.name,
        "quick": quick,
        "machine": info,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *(["--quick"] if quick else [])]),
        "wall_seconds": round(seconds, 1),
        "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows, "notes": t.notes} for t in result.tables],
        "data": _jsonable(result.data),
    }
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path
