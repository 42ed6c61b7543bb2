"""Command line: parse, build the config, run the supervisor, map errors to exit codes.

The exit codes are :data:`errors.EXIT_CODES`; ``--help`` prints them from there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, dirlock, orphans, report, status
from .config import (OPTIONS, Config, build, ensure_appendable, ensure_fd_budget, ensure_writable_dir,
                     read_toml)
from .console import ConsoleView
from .errors import EXIT_CODES, EXIT_SIGNAL_BASE, ConfigError, SupervisorError
from .logs import EVENTS_FILE, EventBus, EventsFile, Log, resolve_format
from .noderdzv import NodeRendezvous, node_addr
from .rendezvous import LocalRendezvous, Rendezvous
from .runlog import new_run_id
from .service import Service
from .stdio import StdoutWriter, reopen_closed
from .storehost import StoreRendezvous
from .supervisor import Supervisor

EPILOG = "exit codes:\n" + "".join(f"  {code:<22} {meaning.replace('`', '')}\n"
                                   for code, meaning in EXIT_CODES) + \
    "Every option is also a key of the TOML config; the command line wins."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print usage too)
        raise ConfigError(f"usage: {message} (see --help)")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="supervisord-ft", description="Fault-tolerant supervisor for distributed "
                  "PyTorch training: launches N workers, restarts the group from the newest "
                  "valid checkpoint when one dies.", epilog=EPILOG,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="subcommand", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run", help="run a training job under supervision",
        usage="supervisord-ft run [--config FILE] [options] [-- COMMAND [ARG ...]]",
        description="Run the built-in training job, or COMMAND (a torchrun-style script) after "
                    "`--`, as a supervised group of workers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", type=Path, help="TOML run config")
    for opt in OPTIONS:
        how: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if opt.kind is bool else {
            "metavar": opt.kind.__name__.upper() if not opt.choices else "{" + ",".join(opt.choices) + "}"}
        run.add_argument(*opt.flags, dest=opt.name, default=argparse.SUPPRESS, **how,
                         help=f"{opt.help.replace('`', '')} "
                              f"(default: {opt.shown_default}){opt.bound}")
    for name, help_, description in READERS:
        view = sub.add_parser(name, help=help_, description=description)
        view.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's run_dir")
        view.add_argument("--run", metavar="RUN_ID", help="this run (a run_id or a unique prefix) "
                                                          "instead of the latest in RUN_DIR")
    sub.choices["status"].add_argument("--json", action="store_true", help="one JSON object")
    sub.choices["report"].add_argument(
        "--output", type=Path, metavar="HTML", help="where to write the report (default: "
        f"RUN_DIR/{report.HTML}); the PNG is written beside it")
    return top


# The offline readers of a run dir: exit 0, or 2 with one line when RUN_DIR holds no run.
READERS = (
    ("status", "print a run's state, step, restarts, last failure and newest checkpoint",
     "Print a run's state in a few lines (the latest run in RUN_DIR unless --run says which); "
     "works while the daemon runs and after it ended."),
    ("report", "write an HTML report with a timeline plot (needs the `report` extra)",
     "Write a self-contained HTML report of a run: a timeline of loss and step per rank with "
     "its failures, recoveries and checkpoints, a table of attempts and the run's goodput."),
)


def _read(ns: argparse.Namespace) -> int:
    try:
        if ns.subcommand == "status":
            code = status.main(ns.run_dir, ns.run, ns.json)
        else:
            code = report.main(ns.run_dir, ns.run, ns.output)
        sys.stdout.flush()
    except BrokenPipeError:  # `status | head -1`: the reader has what it wanted
        # Python flushes stdout again at exit: point it at /dev/null so that is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGNAL_BASE + signal.SIGPIPE  # as a tool killed by SIGPIPE, without a word
    return code


def load_config(argv: Sequence[str]) -> Config:
    argv = list(argv)
    command: list[str] | None = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
        if not command:
            raise ConfigError("command: nothing after `--`")
    ns = vars(parser().parse_args(argv))
    ns.pop("subcommand")
    config_path = ns.pop("config", None)
    toml = read_toml(config_path) if config_path else {}
    return build(toml, ns, command, config_path)


async def _run(cfg: Config) -> int:
    ensure_writable_dir("checkpoint_dir", cfg.checkpoint_dir)
    ensure_writable_dir("run_dir", cfg.run_dir)
    ensure_fd_budget(cfg.num_workers)
    # Multi-node: every node's daemon shares the checkpoint dir; each holds its own run_dir.
    locked = ("run_dir", cfg.run_dir) if cfg.multi_node else ("checkpoint_dir", cfg.checkpoint_dir)
    with dirlock.hold(*locked):
        leftovers = orphans.find_leftovers(cfg.run_dir)  # before this daemon writes to run_dir
        ensure_appendable("run_dir", cfg.run_dir / EVENTS_FILE)
        orphans.become_subreaper()
        # Multi-node: the round's workers' store may be hosted on this node's address.
        LocalRendezvous(node_addr(cfg) if cfg.multi_node else cfg.master_addr, cfg.master_port).check()
        stdout, bus = StdoutWriter(), EventBus()
        async with Service(cfg, bus) as service:  # a taken metrics port stops us here: exit 2
            console = None
            if resolve_format(cfg.log_format, stdout) == "console":
                console = ConsoleView(stdout, show_steps=cfg.show_steps)
                bus.subscribe(console)
            where: dict[str, Any] = {}  # multi-node: every event's node rank and round
            log = Log(EventsFile(cfg.run_dir / EVENTS_FILE), None if console else stdout, bus, where)
            run_id = new_run_id()
            logger = log.logger.bind(run_id=run_id)
            rendezvous = _rendezvous(cfg, logger, where)
            try:
                service.announce(logger)
                await leftovers.kill(logger)
                return await Supervisor(cfg, logger, rendezvous=rendezvous, run_id=run_id).run()
            finally:
                if console is not None:
                    console.close()
                    stdout.close()
                log.close()


def _rendezvous(cfg: Config, log: Any, where: dict[str, Any]) -> Rendezvous:
    if cfg.multi_node:
        return NodeRendezvous(cfg, log, where)
    if cfg.store_host:
        return StoreRendezvous(cfg.master_addr, cfg.master_port, log)
    return LocalRendezvous(cfg.master_addr, cfg.master_port)


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    reopen_closed()  # before anything opens a descriptor that could take the number 0, 1 or 2
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] and argv[0] in {name for name, *_ in READERS}:
            return _read(parser().parse_args(argv))
        cfg = load_config(argv)
        with _runner() as runner:
            return runner.run(_run(cfg))
    except SupervisorError as exc:
        print(f"supervisord-ft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:  # a bug: say so, keep the traceback, and exit with a code of its own
        traceback.print_exc()
        print("supervisord-ft: internal error (a bug, please report it)", file=sys.stderr)
        return SupervisorError.exit_code


if __name__ == "__main__":
    sys.exit(main())
