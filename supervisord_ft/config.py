"""Run configuration: one frozen dataclass, built once from defaults < TOML file < command line.

Every option is declared once in :data:`OPTIONS`; the TOML reader, the command-line parser,
``--help`` and the reference (docs/reference.md) all come from that table. All validation happens in
:func:`build`, and every error names the offending key and value.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import builtin_job, ranklogs, torchrun
from .errors import ConfigError

LOG_FORMATS = ("auto", "json", "console")
# Local ranks one daemon supervises. Each holds a process and up to four descriptors in the daemon
# (FDS_PER_WORKER), so 4096 ranks need ~16,400 (raise `ulimit -n`) and 4096 pids, far above any one
# node's accelerators or cores; beyond it a typo (1000000000) would be taken as a plan.
MAX_WORKERS = 4096
# Descriptors the daemon holds: a base (stdio, event loop, events file, the spawn in progress)
# and per rank its two pipes, and the two connections a diagnosis opens to every live rank's
# channel at once (stacks and collectives), before any signal.
FDS_BASE, FDS_PER_WORKER = 64, 4


# torchrun's defaults and the settings its c10d rendezvous reads (`--rdzv-conf`).
DEFAULT_RDZV_PORT = 29400
# static: torchrun's default; on one node it is the same as c10d (multi-node: see _check_nodes).
RDZV_BACKENDS = ("c10d", "static")
RDZV_CONF_KEYS = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
                  "keep_alive_interval", "keep_alive_max_attempt", "read_timeout", "is_host")


class ExitCodes(tuple):
    """The kind of an option that is a list of worker exit codes (1-255)."""


class Names(tuple):
    """The kind of an option that is a list of dotted names (Python modules)."""



@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # bool, int, float, str, Path, ExitCodes or Names
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    builtin_job: bool = False  # applies only to the built-in `python -m supervisord_ft_worker` job
    alias: str | None = None  # torchrun's name for it: another flag and TOML key
    short: str | None = None  # torchrun's one-letter flag for it (``-r``)

    @property
    def default(self) -> Any:
        return Config.__dataclass_fields__[self.name].default

    @property
    def shown_default(self) -> str:
        """``on``/``off`` for a switch or an unset option, a list comma-separated, else the value."""
        if isinstance(self.default, tuple):
            return ", ".join(map(str, self.default)) or "none"
        return "on" if self.default is True else "off" if self.default in (None, False) else str(self.default)

    @property
    def bound(self) -> str:
        """The upper bound as --help and docs/reference.md show it after the text."""
        return "" if self.maximum is None else f" (at most {self.maximum})"

    @property
    def flags(self) -> list[str]:
        names = [self.name] + ([self.alias] if self.alias else [])
        return ([f"-{self.short}"] if self.short else []) + list(dict.fromkeys(
            f"--{spelling}" for name in names for spelling in (name.replace("_", "-"), name)))


OPTIONS: tuple[Option, ...] = (
    Option("num_workers", int, "worker processes (ranks) in the group, on this node (torchrun's "
           "`nproc_per_node`, also accepted, with its `auto`, `cpu` and `gpu`); each costs the daemon a "
           "process and 2 pipe descriptors, so the soft `ulimit -n` is raised as far as needed and "
           "a hard limit too low is refused at start-up", minimum=1, maximum=MAX_WORKERS,
           alias="nproc_per_node"),
    Option("max_restarts", int, "relaunches allowed; the next failure ends the run FAILED", minimum=0),
    Option("checkpoint_dir", Path, "where `checkpoint_step_<N>.pt` files live"),
    Option("run_dir", Path, "where `events.jsonl` is written (appended to)"),
    Option("grace_period", float, "seconds between SIGTERM and SIGKILL at teardown (torchrun's "
           "`shutdown_timeout`, also accepted)", minimum=0,
           alias="shutdown_timeout"),
    Option("show_steps", bool, "console format: also print every step report (always in "
           "`events.jsonl`)"),
    Option("log_format", str, "stdout format: `json`, `console`, or `auto` (console on a terminal, else json); "
           "`events.jsonl` is always JSON",
           choices=LOG_FORMATS),
    Option("poll_interval", float,
           "seconds between periodic `status` events (failure detection is event-driven and "
           "does not depend on it)", minimum=0.01),
    Option("keep_checkpoints", int, "newest intact checkpoints kept; older ones are deleted once newer ones are "
           "complete (as each appears, at recoveries and at DONE), never the one being resumed from",
           minimum=2),
    Option("master_addr", str, "rendezvous address (`MASTER_ADDR`); checked at start-up"),
    Option("master_port", int, "`MASTER_PORT`; 0 = a fresh free port on every launch; a fixed port must be "
           "free at start-up", minimum=0, maximum=65535),
    Option("jit_checkpoint_timeout", float, "seconds the survivors of a failed rank get to save "
           "their last completed step and exit by themselves before the teardown signals them, "
           "if they armed such a save (`jit_checkpoint_armed`, printed by "
           "`supervisord_ft_worker.contract.SaveOnFailure`); 0 disables (the built-in job then saves nothing on a "
           "peer's death)", minimum=0),
    Option("hang_timeout", float, "the most seconds a rank may go without any sign of progress "
           "(output, a step, a collective entered or retired, steady I/O) before it is declared "
           "hung, diagnosed and the group recovered; once the job's cadence is learnt the limit "
           "is 40x its longest step or collective interval, at least `hang_floor`, at most this "
           "(0 disables)", minimum=0),
    Option("hang_floor", float, "the least seconds a learnt hang limit may be: a slow phase "
           "(an evaluation, a save) longer than this and 40x the longest interval seen before "
           "it would be declared a hang unless it prints, steps, enters a collective or does I/O",
           minimum=0),
    Option("startup_timeout", float, "seconds a rank may take from launch to its first sign of "
           "progress (imports, rendezvous, checkpoint load)", minimum=0),
    Option("channel", bool, "open torch's worker server on a Unix socket in every Python rank "
           "(a private directory under `$TMPDIR`), to read its collectives (flight recorder) "
           "as progress and its stacks when it hangs or a peer fails"),
    Option("startup_window", float, "seconds after a launch within which a failure before any "
           "progress is a start-up failure; the same start-up failure twice in a row is a crash "
           "loop and fails the run (supervisord's `startsecs`)", minimum=0),
    Option("restart_window", float, "`max_restarts` counts the relaunches within this many "
           "seconds (0 = the whole run)", minimum=0),
    Option("restart_backoff", float, "delay before the second relaunch within the window; "
           "doubles with each further one (the first relaunch is immediate)", minimum=0),
    Option("restart_backoff_max", float, "cap on the relaunch delay", minimum=0),
    Option("no_retry_exit_codes", ExitCodes, "worker exit codes that fail the run at once, with "
           "the do-not-requeue exit code (a TOML list, or `2,3` on the command line)"),
    Option("max_stalled_attempts", int, "attempts in a row that fail of the job's own cause and "
           "get no further than where they resumed (no higher step, no checkpoint written) before "
           "the run ends with the do-not-requeue exit code, whatever `restart_window` gives back; "
           "an attempt whose progress cannot be seen counts as progress; the same failure twice "
           "in a row without progress ends it at once (0 turns both rules off)", minimum=0),
    Option("root_cause_wait", float, "seconds the other ranks get to fail on their own when the "
           "first rank to fail died of a lost peer (a knock-on), so that the root's own error is "
           "read before the teardown's signal hides it (0 disables; a multi-node job does not "
           "wait: its root is as likely on another node)", minimum=0),
    Option("max_line_bytes", int,
           "longest worker output line kept; longer lines are cut and marked `truncated`; each "
           "pipe may hold one unfinished line, so this bounds the daemon's memory",
           minimum=1024, maximum=1 << 20),
    Option("metrics_port", int, "serve Prometheus `/metrics`, `/healthz` and `/readyz` on this "
           "port (0 = a free one, logged in `metrics_listening`)", minimum=0, maximum=65535),
    Option("metrics_addr", str, "address the metrics port listens on; anything but loopback "
           "exposes it to the network"),
    Option("store_host", bool, "host each attempt's rendezvous store in a helper process, up "
           "before any rank starts and listening on `master_addr` only (`false`: rank 0 hosts it)"),
    Option("standby", bool, "keep a warm standby interpreter per rank that has imported `preload`, "
           "so a relaunched Python rank skips its imports (`false`: every rank starts cold)"),
    Option("preload", Names, "modules a standby imports before it is handed a rank (a TOML list, "
           "or `torch,numpy` on the command line); set to anything but its default, it is all "
           "a standby imports"),
    Option("standby_early", bool, "where a standby can leave SCHED_IDLE again (CAP_SYS_NICE), "
           "start the pool with the first launch and right after every hand-out at SCHED_IDLE, so "
           "an early crash is warm too (off, or where it cannot: the pool fills once the launched "
           "group settles); where the ranks' start-up uses every core, it slows that start "
           "(2.9 to 5.4 s for 2 ranks on 2 cores): turn it off there"),
    Option("learn_preload", bool, "with `preload` at its default, a standby also imports what "
           "the job's ranks imported from the standard library and installed packages (never the "
           "job's own code), learnt through their channels, so a Lightning or HF job is warm "
           "with no configuration"),
    Option("fast_failed_exit", bool, "a Python rank whose script raised an uncaught exception "
           "leaves once the job's `atexit` handlers have run and its open files are flushed, "
           "skipping the interpreter's teardown (0.4-0.6 s of torch's destructors on the "
           "recovery's path; the peers the recovery stops get none either)"),
    Option("standby_memory", int, "MiB a standby may hold once it imported the learnt modules; "
           "above it they are dropped and standbys import `preload` only", minimum=64),
    Option("nnodes", str, "multi-node: `N` or `MIN:MAX` nodes, one daemon each, as torchrun's "
           "`--nnodes`; with more than one, the nodes meet through the c10d rendezvous (off or 1: "
           "this node alone)"),
    Option("rdzv_endpoint", str, "multi-node: `HOST:PORT` of the rendezvous store (port "
           f"{DEFAULT_RDZV_PORT} if left out), hosted by the node whose address it is"),
    Option("rdzv_id", str, "multi-node: the job's id, the same on every node "
           "(`TORCHELASTIC_RUN_ID` of the workers)"),
    Option("rdzv_backend", str, "multi-node: the rendezvous backend (`static`, torchrun's "
           "default, is accepted for one node, where it is the same)", choices=RDZV_BACKENDS),
    Option("rdzv_conf", str, "multi-node: torch's rendezvous settings as `key=value,...`: "
           + ", ".join(f"`{k}`" for k in RDZV_CONF_KEYS) + " (seconds; torch's defaults)"),
    Option("local_addr", str, "multi-node: this node's address as the others reach it (the "
           "round's workers' store listens there when this node is group rank 0; off: its "
           "fully qualified host name, as torchrun)"),
    Option("log_dir", Path, "per-rank log files in torchrun's layout: `<run id>_<random>/"
           "attempt_<restart>/<local rank>/` holds `stdout.log` and `stderr.log` for the streams "
           "`redirects` or `tee` name, and `error.json` (the rank's `TORCHELASTIC_ERROR_FILE`); "
           "a directory that cannot be written is said once per attempt and supervision goes on"),
    Option("redirects", str, "torchrun's `--redirects`: streams that go to their file in "
           "`log_dir` and no longer to the daemon's stdout (`events.jsonl` keeps every line): "
           "`0` none, `1` stdout, `2` stderr, `3` both, or per local rank as `0:1,1:2`",
           short="r"),
    Option("tee", str, "torchrun's `--tee`: streams that go to their file in `log_dir` and to "
           "the daemon's stdout too (format as `redirects`)", short="t"),
    Option("local_ranks_filter", str, "torchrun's `--local-ranks-filter`: only these local "
           "ranks' output on the daemon's stdout, as `0,1,2` (their files and `events.jsonl` "
           "keep every rank's)"),
    Option("role", str, "the workers' role name (`ROLE_NAME`), as torchrun's `--role`"),
    Option("virtual_local_rank", bool, "torchrun's `--virtual-local-rank`: `LOCAL_RANK` is 0 for "
           "every rank and `CUDA_VISIBLE_DEVICES` names the rank's own device (its local rank's "
           "entry of the daemon's `CUDA_VISIBLE_DEVICES`, else the local rank)"),
    Option("epochs", int, "built-in job: epochs", minimum=1, builtin_job=True),
    Option("steps", int, "built-in job: steps per epoch", minimum=1, builtin_job=True),
    Option("checkpoint_interval", int, "built-in job: checkpoint every N global steps", minimum=1,
           builtin_job=True),
    Option("seed", int, "built-in job: seed for the weights and the synthetic data", minimum=0,
           builtin_job=True),
    Option("crash_at_step", int,
           "built-in job: fault injection, rank `crash_rank` exits 1 after global step K, "
           "first attempt only",
           minimum=1, builtin_job=True),
    Option("crash_rank", int, "built-in job: the rank that crashes", minimum=0,
           builtin_job=True),
)
BY_NAME = {o.name: o for o in OPTIONS}
ALIASES = {o.alias: o.name for o in OPTIONS if o.alias}


@dataclass(frozen=True)
class Config:
    num_workers: int = 2
    max_restarts: int = 3
    checkpoint_dir: Path = Path("checkpoints")
    run_dir: Path = Path("runs/latest")
    grace_period: float = 10.0
    log_format: str = "auto"
    show_steps: bool = False
    poll_interval: float = 30.0
    keep_checkpoints: int = builtin_job.KEEP_CHECKPOINTS
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    jit_checkpoint_timeout: float = 1.0
    hang_timeout: float = 600.0
    hang_floor: float = 90.0
    startup_timeout: float = 1200.0
    startup_window: float = 30.0
    restart_window: float = 3600.0
    restart_backoff: float = 1.0
    restart_backoff_max: float = 30.0
    no_retry_exit_codes: tuple[int, ...] = ()
    max_stalled_attempts: int = 3
    root_cause_wait: float = 5.0
    max_line_bytes: int = 65536
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    store_host: bool = True
    standby: bool = True
    channel: bool = True
    nnodes: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "none"
    rdzv_backend: str = "c10d"
    rdzv_conf: str | None = None
    local_addr: str | None = None
    log_dir: Path | None = None
    redirects: str = "0"
    tee: str = "0"
    local_ranks_filter: str | None = None
    # torch._dynamo too: building any torch.optim optimizer imports it, about 1 s on its own.
    preload: tuple[str, ...] = ("torch", "torch.distributed", "torch.optim", "torch._dynamo")
    standby_early: bool = True
    learn_preload: bool = True
    standby_memory: int = 2048
    fast_failed_exit: bool = True
    role: str = "default"
    virtual_local_rank: bool = False
    epochs: int = builtin_job.EPOCHS
    steps: int = builtin_job.STEPS_PER_EPOCH
    checkpoint_interval: int = builtin_job.CHECKPOINT_INTERVAL
    seed: int = builtin_job.SEED
    crash_at_step: int | None = None
    crash_rank: int = 0
    # A custom command (after `--` or `command = [...]` in TOML); empty = the built-in job.
    command: tuple[str, ...] = ()
    # Extra environment for every worker (TOML `[env]` table).
    env: Mapping[str, str] = field(default_factory=dict)
    # torchrun options given that mean nothing here, (flag, value): said once at start-up.
    ignored: tuple[tuple[str, str], ...] = ()

    @property
    def builtin_job(self) -> bool:
        return not self.command

    @property
    def node_range(self) -> tuple[int, int]:
        """(MIN, MAX) nodes; (1, 1) when ``nnodes`` is not given. Validated by :func:`build`."""
        if self.nnodes is None:
            return 1, 1
        low, _, high = self.nnodes.partition(":")
        return int(low), int(high or low)

    @property
    def multi_node(self) -> bool:
        return self.node_range[1] > 1

    @property
    def rdzv_options(self) -> dict[str, str]:
        """``rdzv_conf`` as a dict (validated by :func:`build`)."""
        pairs = (item.split("=", 1) for item in (self.rdzv_conf or "").split(",") if item.strip())
        return {key.strip(): value.strip() for key, value in pairs}


def _coerce(opt: Option, value: Any, source: str) -> Any:
    """Convert a TOML value or a command-line string to the option's type, or raise."""
    where = f"{opt.name} (from {source})"
    from_cli = isinstance(value, str) and source == "command line"
    if opt.name == "num_workers" and value in torchrun.NPROC_WORDS:
        value = torchrun.local_world_size(value)
    try:
        if opt.kind is bool:
            if not isinstance(value, bool):
                raise TypeError
        elif opt.kind is Names:
            if from_cli:
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(
                    isinstance(v, str) and all(p.isidentifier() for p in v.split(".")) for v in value):
                raise TypeError
            value = tuple(value)
        elif opt.kind is int:
            if from_cli:
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
        elif opt.kind is float:
            if from_cli:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        elif opt.kind is ExitCodes:
            if from_cli:
                value = [int(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in value):
                raise TypeError
            value = tuple(value)
        else:
            if not isinstance(value, str):
                raise TypeError
            if not value:
                raise ConfigError(f"{where}: must not be empty")
            _check_text(where, value)
            value = Path(value) if opt.kind is Path else value
    except (TypeError, ValueError):
        expected = {ExitCodes: "a list of exit codes (1-255)", Names: "a list of module names",
                    bool: "true or false"}.get(opt.kind, opt.kind.__name__)
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
    if opt.minimum is not None and value < opt.minimum:
        raise ConfigError(f"{where}: must be >= {opt.minimum:g}, got {value!r}")
    if opt.maximum is not None and value > opt.maximum:
        raise ConfigError(f"{where}: must be <= {opt.maximum}, got {value!r}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where}: must be one of {', '.join(opt.choices)}, got {value!r}")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} "
                          f"at offset {exc.start}") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None


def _check_text(where: str, text: str) -> None:
    """Refuse what cannot reach a worker or the log intact: a NUL byte (no argv, environment or
    path can hold one) and bytes that are not UTF-8 (surrogate-escaped from argv; the log is
    UTF-8 JSON)."""
    if "\0" in text:
        raise ConfigError(f"{where} contains a NUL byte: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        raise ConfigError(f"{where} is not valid UTF-8: {raw!r}") from None


def _command(value: Any, source: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(a, str) and a for a in value)):
        raise ConfigError(f"command (from {source}): expected a non-empty list of strings, got {value!r}")
    for i, arg in enumerate(value):
        _check_text(f"command (from {source}): argument {i}", arg)
    exe = value[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(f"command (from {source}): {exe!r} is not an executable file")
    elif shutil.which(exe) is None:
        raise ConfigError(f"command (from {source}): {exe!r} not found on PATH")
    return tuple(value)


def _env(value: Any, source: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"env (from {source}): expected a table of strings, got {value!r}")
    for key, text in value.items():
        if not key or "=" in key:
            raise ConfigError(f"env (from {source}): {key!r} is not a variable name (empty or "
                              f"contains '=')")
        _check_text(f"env (from {source}): name {key!r}", key)
        _check_text(f"env (from {source}): {key}", text)
    return dict(value)


def build(toml: Mapping[str, Any], cli: Mapping[str, str], command: list[str] | None = None,
          config_path: Path | None = None, defaults: Mapping[str, Any] | None = None,
          ignored: tuple[tuple[str, str], ...] = ()) -> Config:
    """Merge and validate. ``cli`` holds only the options given on the command line;
    ``defaults`` replace Config's own (``torchrun-ft``'s are torchrun's)."""
    source = str(config_path) if config_path else "config"
    values: dict[str, Any] = {"ignored": ignored, **(defaults or {})}
    given: set[str] = set()
    for key, value in toml.items():
        if key == "command":
            values["command"] = _command(value, source)
        elif key == "env":
            values["env"] = _env(value, source)
        elif key in BY_NAME or key in ALIASES:
            key = ALIASES.get(key, key)
            if key in given:
                raise ConfigError(f"{source}: {key} given twice (once as torchrun's name)")
            values[key] = _coerce(BY_NAME[key], value, source)
            given.add(key)
        else:
            raise ConfigError(f"{source}: unknown key {key!r}")
    for key, value in cli.items():
        values[key] = _coerce(BY_NAME[key], value, "command line")
        given.add(key)
    if command:
        values["command"] = _command(command, "command line")
    cfg = Config(**values)
    if cfg.command:
        job_keys = sorted(k for k in given if BY_NAME[k].builtin_job)
        if job_keys:
            raise ConfigError(f"{job_keys[0]}: applies only to the built-in job, but a command was given")
    visible = cfg.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if cfg.virtual_local_rank and visible is not None and len(visible.split(",")) < cfg.num_workers:
        raise ConfigError(f"virtual_local_rank: CUDA_VISIBLE_DEVICES={visible!r} names fewer devices "
                          f"than num_workers ({cfg.num_workers})")
    if cfg.metrics_port and cfg.metrics_port == cfg.master_port:
        raise ConfigError(f"metrics_port: {cfg.metrics_port} is also master_port")
    cfg = _check_nodes(cfg)
    _check_rank_logs(cfg)
    ranks = cfg.num_workers * cfg.node_range[1]
    if cfg.crash_rank >= ranks:
        raise ConfigError(f"crash_rank: must be < num_workers ({cfg.num_workers})"
                          f"{' x nnodes' if cfg.multi_node else ''}, got {cfg.crash_rank}")
    return cfg


def _check_nodes(cfg: Config) -> Config:
    """``nnodes`` as torchrun reads it, and what a multi-node run needs beside it."""
    if cfg.nnodes is not None:
        parts = cfg.nnodes.split(":")
        if not (len(parts) <= 2 and all(p.isdigit() for p in parts)
                and 1 <= int(parts[0]) <= int(parts[-1])):
            raise ConfigError(f"nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got {cfg.nnodes!r}")
    items = [item for item in (cfg.rdzv_conf or "").split(",") if item.strip()]
    if any("=" not in item for item in items):
        raise ConfigError(f"rdzv_conf: expected key=value,..., got {cfg.rdzv_conf!r}")
    for key, value in cfg.rdzv_options.items():
        if key not in RDZV_CONF_KEYS:
            raise ConfigError(f"rdzv_conf: unknown setting {key!r} (known: {', '.join(RDZV_CONF_KEYS)})")
        if key != "is_host" and not (value.isdigit() and int(value) > 0):
            raise ConfigError(f"rdzv_conf: {key} must be a whole number of seconds > 0, got {value!r}")
    if not cfg.multi_node:
        return cfg
    if cfg.rdzv_backend == "static":  # torchrun's --node-rank/--master-addr: fixed node ranks
        raise ConfigError(f"rdzv_backend: static: nodes meet through c10d here (nnodes {cfg.nnodes}: "
                          "give --rdzv-backend c10d --rdzv-endpoint HOST:PORT)")
    if cfg.rdzv_endpoint is None:
        raise ConfigError(f"rdzv_endpoint: required with nnodes {cfg.nnodes} (HOST:PORT of the "
                          "rendezvous store)")
    host, port = endpoint_parts(cfg.rdzv_endpoint)
    return replace(cfg, rdzv_endpoint=f"{host}:{port}")


def endpoint_parts(endpoint: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (an IPv6 address in brackets) as its host, as written, and its port
    (:data:`DEFAULT_RDZV_PORT` if left out, as torchrun); ConfigError if it is neither."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or endpoint.endswith("]"):  # HOST, or an IPv6 [ADDR], with no port
        return endpoint, DEFAULT_RDZV_PORT
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"rdzv_endpoint: expected HOST:PORT, got {endpoint!r}")
    return host, int(port)


def _check_rank_logs(cfg: Config) -> None:
    """``redirects``, ``tee`` and ``local_ranks_filter`` in torchrun's formats."""
    for key in ("redirects", "tee"):
        value = getattr(cfg, key)
        try:
            streams = ranklogs.parse_std(value)
        except ValueError:
            raise ConfigError(f"{key}: expected 0, 1, 2 or 3, or LOCAL_RANK:0-3 pairs as 0:1,1:2 "
                              f"(torchrun's format), got {value!r}") from None
        if cfg.log_dir is None and any(streams.values() if isinstance(streams, dict) else (streams,)):
            raise ConfigError(f"{key}: {value!r} sends output to files, but no log_dir is given")
    if cfg.local_ranks_filter is not None and not all(
            r.strip().isdigit() for r in cfg.local_ranks_filter.split(",")):
        raise ConfigError(f"local_ranks_filter: expected local ranks as 0,1,2, got "
                          f"{cfg.local_ranks_filter!r}")


def ensure_writable_dir(key: str, path: Path) -> None:
    """Create ``path`` if needed and check that files can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create directory {str(path)!r}: {exc.strerror}") from None
    if not path.is_dir():
        raise ConfigError(f"{key}: {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: directory {str(path)!r} is not writable")


def reference_table() -> str:
    """docs/reference.md's table of options, generated here so that it cannot drift from the code."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for opt in OPTIONS:
        default = opt.default
        if default is None or isinstance(default, bool):
            shown = opt.shown_default
        elif default == ():
            shown = "(none)"
        elif isinstance(default, tuple):
            shown = "`" + ", ".join(default) + "`"
        elif isinstance(default, (str, Path)):
            shown = f"`{default}`"
        else:
            shown = str(default)
        key = f"`{opt.name}`" + (f" (`-{opt.short}`)" if opt.short else "")
        rows.append(f"| {key} | {shown} | {opt.help}{opt.bound} |")
    rows.append("| `command` | (built-in job) | TOML only (on the command line: torchrun's "
                "`SCRIPT [ARG ...]`, or any command after `--`): the command each rank runs, a "
                "list of strings |")
    rows.append("| `[env]` | | TOML only: a table of extra environment variables for every worker "
                "(names non-empty and without `=`, no NUL byte) |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class FdLimit:
    """The soft RLIMIT_NOFILE as :func:`ensure_fd_budget` found and left it."""

    before: int
    after: int
    needed: int


def ensure_fd_budget(num_workers: int) -> FdLimit | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit when it is below what ``num_workers``
    need (as daemons do; 1,024 under systemd and most shells, ~4,200 needed at 1,024 ranks), or
    refuse: past it a launch fails to spawn a rank, or a diagnosis loses ranks to EMFILE. The
    hard limit, not the estimate: the estimate does not see a job's own descriptors. The limit
    raised, for the caller to say (None: left as it was)."""
    need = FDS_BASE + FDS_PER_WORKER * num_workers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(f"num_workers: {num_workers} ranks need about {need} open files, but "
                          f"RLIMIT_NOFILE allows {hard} (raise `ulimit -n` or LimitNOFILE)")
    target = need if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return FdLimit(soft, target, need)


def ensure_appendable(key: str, path: Path) -> None:
    """Check that ``path`` can be opened for appending (not a directory, not read-only)."""
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot append to {str(path)!r}: {exc.strerror}") from None


def as_dict(cfg: Config) -> dict[str, Any]:
    """JSON-friendly view, for the `config` event at start-up."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    out["env"] = dict(cfg.env)
    return out

