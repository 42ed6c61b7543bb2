"""Command line: parse, build the config, run the supervisor, map errors to exit codes.

The exit codes are :data:`errors.EXIT_CODES`; ``--help`` prints them from there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__, dirlock, orphans
from .config import OPTIONS, Config, build, ensure_writable_dir, read_toml
from .errors import EXIT_CODES, ConfigError, SupervisorError
from .logs import EventsFile, Log
from .rendezvous import LocalRendezvous
from .stdio import StdoutWriter, reopen_closed
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
        meta = opt.kind.__name__.upper() if not opt.choices else "{" + ",".join(opt.choices) + "}"
        run.add_argument(*opt.flags, dest=opt.name, metavar=meta, default=argparse.SUPPRESS,
                         help=f"{opt.help.replace('`', '')} "
                              f"(default: {'off' if opt.default is None else opt.default})")
    return top


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
    with dirlock.hold("checkpoint_dir", cfg.checkpoint_dir):
        leftovers = orphans.find_leftovers(cfg.run_dir)  # before this daemon writes to run_dir
        orphans.become_subreaper()
        rendezvous = LocalRendezvous(cfg.master_addr, cfg.master_port)
        rendezvous.check()
        log = Log(cfg.log_format, EventsFile(cfg.run_dir / "events.jsonl"), StdoutWriter())
        try:
            await leftovers.kill(log.logger)
            return await Supervisor(cfg, log.logger, rendezvous=rendezvous).run()
        finally:
            log.close()


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
