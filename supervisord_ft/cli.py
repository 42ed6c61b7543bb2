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

from . import __version__, dirlock, orphans, rdzvservice, report, status, torchrun
from .config import (DEFAULT_RDZV_PORT, OPTIONS, Config, build, ensure_appendable, ensure_fd_budget, ensure_writable_dir,
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
    _run_arguments(sub.add_parser(
        "run", help="run a training job under supervision",
        usage="supervisord-ft run [--config FILE] [options] [SCRIPT [ARG ...] | -- COMMAND [ARG ...]]",
        description="Run the built-in training job, or a training script as torchrun would "
                    "(SCRIPT [ARG ...], with torchrun's options), or any COMMAND after `--`, as a "
                    "supervised group of workers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))
    for name, help_, description in READERS:
        view = sub.add_parser(name, help=help_, description=description)
        view.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's run_dir")
        view.add_argument("--run", metavar="RUN_ID", help="this run (a run_id or a unique prefix) "
                                                          "instead of the latest in RUN_DIR")
    store = sub.add_parser("rdzv-store", help="serve a multi-node job's rendezvous store apart from "
                           "its training nodes", description=rdzvservice.__doc__.split("\n\n")[1]
                           .replace("\n", " ").replace("``", "`"))
    store.add_argument("endpoint", metavar="HOST[:PORT]", help="the address to listen on (this "
                       f"machine's) and port (default {DEFAULT_RDZV_PORT}): every node's --rdzv-endpoint")
    sub.choices["status"].add_argument("--json", action="store_true", help="one JSON object")
    sub.choices["report"].add_argument(
        "--output", type=Path, metavar="HTML", help="where to write the report (default: "
        f"RUN_DIR/{report.HTML}); the PNG is written beside it")
    return top


def torchrun_parser() -> argparse.ArgumentParser:
    """``torchrun-ft``: ``supervisord-ft run`` under torchrun's name, with torchrun's defaults."""
    return _run_arguments(_Parser(
        prog="torchrun-ft", usage="torchrun-ft [options] SCRIPT [ARG ...]",
        description="supervisord-ft run with torchrun's defaults (one rank, no restart): "
                    "`torchrun ARGS` and `torchrun-ft ARGS` run the same job, the second one "
                    "supervised.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))


def _run_arguments(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    run.add_argument("--config", type=Path, help="TOML run config")
    for opt in OPTIONS:
        how: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if opt.kind is bool else {
            "metavar": opt.kind.__name__.upper() if not opt.choices else "{" + ",".join(opt.choices) + "}"}
        run.add_argument(*opt.flags, dest=opt.name, default=argparse.SUPPRESS, **how,
                         help=f"{opt.help.replace('`', '')} "
                              f"(default: {opt.shown_default}){opt.bound}")
    form = run.add_argument_group("torchrun's command forms (with SCRIPT)")
    form.add_argument("-m", "--module", action="store_true",
                      help="SCRIPT is a module, run as `python -m SCRIPT`")
    form.add_argument("--no-python", "--no_python", dest="no_python", action="store_true",
                      help="run SCRIPT itself, not with python")
    form.add_argument("--run-path", "--run_path", dest="run_path", action="store_true",
                      help="run the script path with python (torchrun: runpy.run_path); wins "
                           "over -m and --no-python")
    form.add_argument("--standalone", action="store_true",
                      help="one node, its own local rendezvous: what a run without nnodes does")
    form.add_argument("script", nargs=argparse.REMAINDER, metavar="SCRIPT [ARG ...]",
                      help="the training script and its arguments, as torchrun's")
    ignored = run.add_argument_group("torchrun's options that mean nothing here (accepted, "
                                     "and said once in torchrun_option_ignored)")
    for opt in torchrun.IGNORED:
        ignored.add_argument(*opt.flags, dest=_ignored_dest(opt), default=argparse.SUPPRESS,
                             metavar="VALUE", help=opt.why)
    return run


def _ignored_dest(opt: torchrun.Ignored) -> str:
    return "ignored:" + opt.flags[0]


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


def load_config(argv: Sequence[str], torchrun_form: bool = False) -> Config:
    """``argv``: ``run ...`` of ``supervisord-ft``, or ``torchrun-ft``'s whole argv."""
    parse = (torchrun_parser() if torchrun_form else parser()).parse_args
    argv = list(argv)
    ns: dict[str, Any] = {}
    command: list[str] | None = None
    if "--" in argv:  # `-- COMMAND`, unless the `--` is among a SCRIPT's own arguments
        cut = argv.index("--")
        ns = vars(parse(argv[:cut]))
        if not ns["script"]:
            command = argv[cut + 1:]
            if not command:
                raise ConfigError("command: nothing after `--`")
    if command is None:
        ns = vars(parse(argv))
    ns.pop("subcommand", None)
    script = ns.pop("script")
    forms = {name: ns.pop(name) for name in ("module", "no_python", "run_path", "standalone")}
    if script:
        command = torchrun.command(script, module=forms["module"], no_python=forms["no_python"],
                                   run_path=forms["run_path"])
    elif torchrun_form:
        raise ConfigError("usage: the following arguments are required: SCRIPT (see --help)")
    elif given := [name for name in ("module", "no_python", "run_path") if forms[name]]:
        raise ConfigError(f"{given[0]}: applies to a SCRIPT given as torchrun's, not to "
                          f"{'a command after `--`' if command else 'the built-in job'}")
    ignored = tuple((opt.flags[0], ns.pop(_ignored_dest(opt))) for opt in torchrun.IGNORED
                    if _ignored_dest(opt) in ns)
    config_path = ns.pop("config", None)
    toml = read_toml(config_path) if config_path else {}
    cfg = build(toml, ns, command, config_path, torchrun.DEFAULTS if torchrun_form else None,
                ignored)
    if forms["standalone"] and cfg.multi_node:
        raise ConfigError(f"standalone: one node with its own rendezvous, but nnodes is {cfg.nnodes}")
    return cfg


async def _run(cfg: Config) -> int:
    ensure_writable_dir("checkpoint_dir", cfg.checkpoint_dir)
    ensure_writable_dir("run_dir", cfg.run_dir)
    fd_limit = ensure_fd_budget(cfg.num_workers)
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
                if fd_limit is not None:
                    logger.info("open_files_limit_raised", before=fd_limit.before, after=fd_limit.after,
                                needed=fd_limit.needed, num_workers=cfg.num_workers,
                                reason="the soft RLIMIT_NOFILE was below what the ranks need: raised to the hard limit")
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


def main(argv: Sequence[str] | None = None, torchrun_form: bool = False) -> int:
    reopen_closed()  # before anything opens a descriptor that could take the number 0, 1 or 2
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not torchrun_form and argv[:1] and argv[0] in {name for name, *_ in READERS}:
            return _read(parser().parse_args(argv))
        if not torchrun_form and argv[:1] == ["rdzv-store"]:
            return rdzvservice.main(parser().parse_args(argv).endpoint)
        cfg = load_config(argv, torchrun_form)
        with _runner() as runner:
            return runner.run(_run(cfg))
    except SupervisorError as exc:
        print(f"supervisord-ft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:  # a bug: say so, keep the traceback, and exit with a code of its own
        traceback.print_exc()
        print("supervisord-ft: internal error (a bug, please report it)", file=sys.stderr)
        return SupervisorError.exit_code


def torchrun_main(argv: Sequence[str] | None = None) -> int:
    """The ``torchrun-ft`` command."""
    return main(argv, torchrun_form=True)


if __name__ == "__main__":
    sys.exit(main())
