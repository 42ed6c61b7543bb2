"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, print their tables, write bench/results/.

Each benchmark compares our daemon with torchrun on the same machine, in the same invocation,
on the same script. ``--quick`` runs each once at a small size (CI runs it so the suite never
rots: it checks that every benchmark produced numbers, never what they are). A benchmark that
fails is reported and the rest still run; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from types import ModuleType

from supervisord_ft.orphans import become_subreaper

from . import (channel, checkpoint_stall, detection, failures, frameworks, goodput, goodput_model, multinode,
               overhead, ranks, rdzv_load, recovery, scale, slow_consumer, standby_cost, status_log, steps_lost, teardown)
from .report import machine, save

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (
    detection, recovery, steps_lost, goodput, teardown, overhead, scale, checkpoint_stall, slow_consumer,
    standby_cost, multinode, channel, failures, status_log, frameworks, rdzv_load, ranks, goodput_model)}


async def main(names: list[str], quick: bool) -> int:
    become_subreaper()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
          f"Python {info['python']}, torch {info['torch']}, {info['date']}; {'quick' if quick else 'full'} run",
          flush=True)
    failed = []
    for name in names:
        started = time.monotonic()
        try:
            result = await BENCHMARKS[name].run(quick)
        except Exception:  # one broken benchmark must not hide the others' numbers; it fails the run
            traceback.print_exc()
            failed.append(name)
            continue
        seconds = time.monotonic() - started
        for table in result.tables:
            print(table.render(), flush=True)
        print(f"\n[{name}: {seconds:.0f} s, wrote {save(result, info, quick, seconds)}]", flush=True)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark once, at a small size (CI)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these: {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    return asyncio.run(main(args.only, args.quick))


if __name__ == "__main__":
    sys.exit(cli())
