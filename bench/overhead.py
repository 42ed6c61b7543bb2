"""6. Daemon overhead: CPU seconds and peak RSS per million worker output lines, and the highest
sustained line rate before lines are delayed more than 100 ms.

One light worker prints short JSON lines at a fixed rate, each stamped with its write time.

- Cost: 1M lines (100k in quick mode) at 40k lines/s. The launcher's own CPU (read from /proc
  at its exit, children excluded; it includes its ~0.1 s start-up) and peak RSS (VmHWM, sampled
  every 0.1 s). torchrun runs the same flood for reference: it never reads worker output (the
  lines go straight to the terminal, unstructured), so its cost is its agent's baseline.
- Rate: a ladder of rates, 3 s each (1 s in quick mode), then bisection between the last rate
  that passed and the first that failed. A rate passes when no line was dropped and the p99 delay
  (the daemon's event timestamp − the line's write time) is at most 100 ms. The daemon's stdout
  goes to /dev/null; the delays come from its ``events.jsonl``, which it writes for every line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .launch import COLD, TORCHRUN_TUNED, Launch, Ours, Runner, iso_time
from .report import Result, Summary, Table
from .workloads import LightJob

NAME = "overhead"
COST_RATE = 40_000
MAX_DELAY_S = 0.100
TIMEOUT = 600.0


def flood(lines: int, rate: float) -> LightJob:
    return LightJob(("--flood-lines", str(lines), "--flood-rate", str(rate)))


@dataclass(frozen=True)
class Delays:
    rate: int
    lines: int
    dropped: int
    delay_ms: Summary

    @property
    def passed(self) -> bool:
        return self.dropped == 0 and self.delay_ms.n == self.lines and self.delay_ms.p99 <= MAX_DELAY_S * 1e3


def read_delays(events: Path, rate: int, lines: int) -> Delays:
    delays, dropped = [], 0
    with open(events, "rb") as fh:
        for line in fh:
            if b'"worker_event":"tick"' in line:
                ev = json.loads(line)
                delays.append((iso_time(ev["timestamp"]) - ev["t"]) * 1e3)
            elif b'"worker_output_dropped"' in line:
                dropped += json.loads(line)["lines"]
    return Delays(rate, lines, dropped, Summary.of(delays, p99=True))


async def delays_at(rate: int, seconds: float) -> Delays:
    lines = int(rate * seconds)
    async with Launch(Ours(options=COLD), flood(lines, rate), workers=1, capture=False) as run:
        await run.wait_exit(TIMEOUT)
        return read_delays(run.workdir / "run" / "events.jsonl", rate, lines)


async def cost(runner: Runner, lines: int) -> dict[str, float]:
    async with Launch(runner, flood(lines, COST_RATE), workers=1, capture=False) as run:
        await run.wait_exit(TIMEOUT)
    return {"cpu_s": run.usage.cpu_s, "peak_rss_mib": run.usage.peak_rss_kib / 1024}


async def run(quick: bool) -> Result:
    lines, seconds, ladder, bisections = (100_000, 1.0, (20_000, 80_000), 0) if quick else \
        (1_000_000, 3.0, (10_000, 20_000, 40_000, 60_000, 80_000, 120_000, 160_000), 2)
    costs = {r.name: await cost(r, lines) for r in (Ours(options=COLD), TORCHRUN_TUNED)}
    tried: list[Delays] = []
    for rate in ladder:
        tried.append(await delays_at(rate, seconds))
        if not tried[-1].passed:
            break
    passed = [d.rate for d in tried if d.passed]
    failed = [d.rate for d in tried if not d.passed]
    low, high = (max(passed, default=0), min(failed, default=0))
    for _ in range(bisections if high else 0):
        mid = (low + high) // 2
        tried.append(d := await delays_at(mid, seconds))
        low, high = (mid, high) if d.passed else (low, mid)

    usage = Table(f"Launcher cost of {lines:,} worker lines at {COST_RATE:,} lines/s",
                  ["launcher", "CPU s", "CPU s per 1M lines", "peak RSS MiB"])
    costs["ours"]["cpu_s_per_million"] = costs["ours"]["cpu_s"] / lines * 1e6
    for name, c in costs.items():
        per_million = f"{c['cpu_s_per_million']:.2f}" if "cpu_s_per_million" in c else "— (reads no lines)"
        usage.add(name, f"{c['cpu_s']:.2f}", per_million, f"{c['peak_rss_mib']:.1f}")
    usage.notes.append("torchrun does not read worker output (it goes straight to its stdout, unparsed): its row is "
                       "the agent's own baseline over the same run, not a per-line cost.")
    rates = Table("Line rate vs delay (ours): worker write → daemon event",
                  ["lines/s", "lines", "dropped", "delay ms, median [min–max]", "p99 ms", "≤ 100 ms p99, no drops"])
    for d in sorted(tried, key=lambda d: d.rate):
        rates.add(f"{d.rate:,}", f"{d.lines:,}", d.dropped, d.delay_ms.fmt(digits=1), f"{d.delay_ms.p99:.1f}",
                  "yes" if d.passed else "no")
    rates.notes.append(f"Highest sustained rate found: {low:,} lines/s (the first failing rate: {high:,}).")
    return Result(NAME, [usage, rates], {"cost": costs, "sustained_lines_per_s": low, "first_failing": high,
                                         "rates": [d.__dict__ for d in tried]})
