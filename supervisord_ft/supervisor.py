"""The supervisor loop: owns the state machine, the worker group and the restart accounting.

One coroutine decides everything. While the group runs it awaits the first of (a worker exit,
a hang, a stop request) with ``asyncio.wait(FIRST_COMPLETED)``; nothing polls. Signal handlers
only record the request; output readers only stamp progress clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Awaitable
from typing import Any

from . import (blocking, builtin_job, causes, checkpoints, diagnosis, envvars, flight, orphans, procfs, retention,
               runlog, tasks, torchrun)
from .attempt import Attempt, Recovery, first_to_fail
from .causes import Cause, Explanation
from .channel import FR_BUFFER, FR_ENTRIES, Sockets, exiting
from .config import Config, as_dict
from .errors import (EXIT_DONE, EXIT_FAILED, EXIT_NO_REQUEUE, EXIT_SIGNAL_BASE, CheckpointDirsDiffer,
                     CheckpointError)
from .fsm import State, StateMachine
from .output import OutputRouter, Source
from .progress import Looker
from .ranklogs import RankLogs, Routing
from .rendezvous import LocalRendezvous, News, RankInfo, Rendezvous, RendezvousFailed
from .restarts import Failure, RestartPolicy
from .standby import StandbyLauncher
from .watchdog import Cadence, Hang, Watchdog
from .workers import Launcher, SubprocessLauncher, Worker, WorkerSpec, spawn, stop, wait_exits

EXIT_CODES = {State.DONE: EXIT_DONE, State.FAILED: EXIT_FAILED}
STEP_EVENT = "step"
# Printed by supervisord_ft_worker.contract.SaveOnFailure: this rank saves its last completed step if a peer dies.
JIT_ARMED_EVENT = "jit_checkpoint_armed"
# News that ends an attempt without a failure of the job's: a new round, no restart spent.
FREE_ROUNDS = {"rejoin": "a new round for a node that joins",
               "store": "a new store host for ranks that had not met yet"}
MAX_FREE_STORE_ROUNDS = 3
ERROR_DIR_WAIT = 1.0  # making a folder takes milliseconds; past this the run dir is stalled
EXIT_FLUSH_LINES = 1000  # about 10-20 ms of rendering
# A checkpoint directory on storage that hangs must not hold a recovery: past this, an
# attempt's progress is taken as unknown (so as progress). Nor the end: the last prune is left.
LISTING_TIMEOUT = 5.0
CADENCE_FILE = "cadence.json"  # the job's learnt rhythm, for the hang limit of the next run
# A terminal or ssh session closing (HUP), Ctrl+\ (QUIT), Ctrl+C (INT), systemd/SLURM/Kubernetes
# (TERM): each is a graceful stop, exit 128 + n.
STOP_SIGNALS = tuple(signal.Signals[name] for name in envvars.STOP_SIGNALS.split(","))
# SLURM's pre-timeout warning, a preStop hook: passed on to the ranks that handle them.
FORWARD_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Supervisor:
    def __init__(self, cfg: Config, log: Any, launcher: Launcher | None = None,
                 rendezvous: Rendezvous | None = None, run_id: str | None = None) -> None:
        self.cfg = cfg
        self.log = log
        # Given to the workers; the caller binds the same id on ``log`` (cli._run does).
        self.run_id = run_id or runlog.new_run_id()
        learn = cfg.learn_preload and cfg.preload == Config.preload
        self.launcher = launcher or (StandbyLauncher(cfg.num_workers, cfg.preload, log, cfg.startup_timeout,
                                                     learn, cfg.standby_memory, cfg.standby_early)
                                     if cfg.standby else SubprocessLauncher())
        self.rendezvous = rendezvous or LocalRendezvous(cfg.master_addr, cfg.master_port)
        # torchrun's per-rank files, in a job folder named after the workers' TORCHELASTIC_RUN_ID.
        self.rank_logs = RankLogs(cfg, cfg.rdzv_id if self.rendezvous.multi_node else self.run_id) \
            if cfg.log_dir is not None else None
        self.fsm = StateMachine(on_change=self._log_transition)
        self.policy = RestartPolicy(cfg.max_restarts, cfg.restart_window, cfg.restart_backoff,
                                    cfg.restart_backoff_max, cfg.no_retry_exit_codes,
                                    cfg.max_stalled_attempts)
        self.retention = retention.Retention(cfg.checkpoint_dir, cfg.keep_checkpoints, log)
        self.router = OutputRouter(cfg.max_line_bytes, on_line=self._on_line, on_json=self._on_json,
                                   on_bytes=self._on_bytes)
        self.attempt: Attempt | None = None  # the current (or last) launch attempt
        self.resume_from: checkpoints.Checkpoint | None = None
        self.stop_signal: int | None = None
        self._stop_requested = asyncio.Event()
        self._kill_now = asyncio.Event()
        self._set_aside: SetAside | None = None  # the last checkpoint a fallback moved aside
        self._end_reason = ""  # the reason of the transition to the final state
        # Opened before anything starts: a TMPDIR too deep for a socket path is a usage error.
        self.sockets = Sockets() if cfg.channel else None
        self.cadence = Cadence.load(cfg.run_dir / CADENCE_FILE)
        self._timeout_said = self.cadence.timeout(cfg.hang_timeout, cfg.hang_floor)
        self._no_channel_said: set[int] = set()
        self._reports_steps = False  # some rank of this run printed a step line
        self._high_step: int | None = None  # the highest step any earlier attempt reported
        self._requeue = True  # False once the run failed of a cause a rerun would repeat
        self._store_lost = 0  # store hosts lost in a row before the ranks met

    @property
    def restarts(self) -> int:
        return self.policy.total

    @property
    def workers(self) -> list[Worker]:
        return self.attempt.workers if self.attempt is not None else []

    # -- signals and output: record, nothing else --------------------------------------------
    def request_stop(self, sig: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
            self._stop_requested.set()
        else:
            self._kill_now.set()

    def forward(self, sig: int) -> None:
        """Pass ``sig`` on to every live rank that has a handler for it; never die of it."""
        workers = [w for w in self.workers if w.alive]
        sent = [w.rank for w in workers if w.forward(sig)]
        self.log.info("signal_forwarded", signal=signal.Signals(sig).name, ranks=sent,
                      skipped=[w.rank for w in workers if w.rank not in sent],
                      attempt=self.attempt.id if self.attempt else None)

    def _current(self, source: Source) -> Attempt | None:
        """The attempt ``source`` belongs to, or None for a late line of a torn-down one."""
        a = self.attempt
        return a if a is not None and source.attempt == a.id else None

    def _on_bytes(self, source: Source, data: bytes) -> None:
        if (a := self._current(source)) is not None:
            a.watchdog.output(source.rank)
            if a.logs is not None:
                a.logs.write(source.rank, source.stream, data)

    def _on_line(self, source: Source, raw: bytes) -> None:
        if (a := self._current(source)) is not None and source.stream == "stderr":
            a.line(source.rank, raw)

    def _on_json(self, source: Source, fields: dict[str, Any]) -> None:
        if (a := self._current(source)) is None:
            return
        if fields.get("event") == JIT_ARMED_EVENT:
            a.jit_armed.add(source.rank)
        if fields.get("event") != STEP_EVENT:
            return
        a.watchdog.step(source.rank)
        self._reports_steps = True
        if isinstance(step := fields.get("step"), int) and (a.high_step is None or step > a.high_step):
            a.high_step = step
        self._training(a, step, source.log)

    def _training(self, a: Attempt, step: Any, log: Any, by_step: bool = True) -> None:
        """A rank of ``a`` reported a step or its collectives moved: the group trains."""
        if not by_step and self._reports_steps:
            return  # a job that reports steps has recovered at its first step, not its first collective
        if not a.stepped:
            a.stepped = True
            self._store_lost = 0
            self.launcher.settled()
            if a.recovery is not None:
                now = time.monotonic()
                log.info("recovered", step=step, seconds=round(now - a.recovery.since, 3),
                         phases=a.recovery.phases(a.started_at, now))

    def _collectives_moved(self, a: Attempt, rank: int) -> None:
        self._training(a, None, self.log.bind(rank=rank, restart=a.restart, attempt=a.id),
                       by_step=False)

    def _cadence_changed(self) -> None:
        """Say the hang limit the job's cadence now gives, when it changes; keep it for the next run."""
        if (timeout := self.cadence.timeout(self.cfg.hang_timeout, self.cfg.hang_floor)) != self._timeout_said:
            self._timeout_said = timeout
            self.log.info("hang_timeout_learnt", timeout=round(timeout, 3),
                          longest_interval=round(self.cadence.longest, 3),
                          samples=self.cadence.samples, cap=self.cfg.hang_timeout)
            self.cadence.save(self.cfg.run_dir / CADENCE_FILE)

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop, sig)
        for sig in FORWARD_SIGNALS:
            loop.add_signal_handler(sig, self.forward, sig)
        emitter = tasks.start("output-emitter", self.router.run, self.log)
        ticker = tasks.start("status", self._status_ticker, self.log)
        self.log.info("supervisor_start", pid=os.getpid(), host=socket.gethostname(),
                      python=sys.executable, loop=type(loop).__module__.split(".")[0],
                      config=as_dict(self.cfg))
        for option, value in self.cfg.ignored:
            self.log.warning("torchrun_option_ignored", option=option, value=value,
                             why=torchrun.why_ignored(option))
        if envvars.sets_omp_threads(self._launcher_env(), self.cfg.num_workers):
            self.log.warning("warning", message=envvars.OMP_WARNING)
        await self.retention.start()
        steps = {
            State.LAUNCHING: self._launch,
            State.RUNNING: self._watch,
            State.RECOVERING: self._recover,
            State.STOPPING: self._shutdown,
        }
        try:
            try:  # multi-node: chosen in each round, once no worker of any node is alive
                self.resume_from = None if self.rendezvous.multi_node else self._select_checkpoint()
            except CheckpointError as exc:
                self.fsm.transition(State.FAILED, f"checkpoint_dir: {exc}")
            while not self.fsm.state.terminal:
                await steps[self.fsm.state]()
        finally:
            for sig in STOP_SIGNALS + FORWARD_SIGNALS:
                loop.remove_signal_handler(sig)
            if any(w.alive for w in self.workers):  # only on an internal error: never orphan
                await stop(self.workers, 0, self._kill_now)
            await orphans.sweep(self.workers, self.log)  # at every end, nothing a worker started lives on
            await orphans.forget(self.cfg.run_dir)
            await self.launcher.close()
            self.retention.close()
            await self.rendezvous.close(self.fsm.state.value, self._end_reason, self.stop_signal)
            if self.sockets is not None:
                self.sockets.close()
            ticker.cancel()
            emitter.cancel()
            self.router.flush()
            if self.rank_logs is not None:
                self.rank_logs.close()
        code = EXIT_CODES.get(self.fsm.state, EXIT_SIGNAL_BASE + (self.stop_signal or 0))
        if self.fsm.state is State.FAILED and not self._requeue:
            code = EXIT_NO_REQUEUE
        (self.log.error if self.fsm.state is State.FAILED else self.log.info)(
            "supervisor_exit", state=self.fsm.state.value, restarts=self.restarts,
            attempts=self.attempt.id + 1 if self.attempt else 0, exit_code=code)
        return code

    def _log_transition(self, before: State, after: State, reason: str) -> None:
        self._end_reason = reason
        (self.log.error if after is State.FAILED else self.log.info)("state_changed", **{"from": before.value, "to": after.value},
                      restart=self.restarts, attempt=self.attempt.id if self.attempt else None,
                      reason=reason)

    def _stop_reason(self) -> str:
        return f"signal {signal.Signals(self.stop_signal or 0).name}"

    async def _status_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval)
            self.log.info("status", state=self.fsm.state.value, restarts=self.restarts,
                          attempt=self.attempt.id if self.attempt else None,
                          alive=self.attempt.alive() if self.attempt else [],
                          output_lines=self.router.lines, **daemon_usage())
            orphans.reap(self.workers)

    # -- LAUNCHING ------------------------------------------------------------------------------
    async def _next_attempt(self) -> Attempt | None:
        """The next attempt, or None if a stop request came while the group was meeting."""
        previous = self.attempt
        attempt_id = previous.id + 1 if previous is not None else 0
        meeting = asyncio.ensure_future(self.rendezvous.next_round(attempt_id, self.cfg.num_workers))
        stop_wait = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({meeting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            if not meeting.done():
                meeting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await meeting
        if meeting.cancelled():
            return None
        endpoint, ranks = meeting.result()
        if self.rendezvous.multi_node:
            await self._join_round(ranks[0])
        return Attempt(attempt_id, self.restarts, endpoint, ranks,
                       Watchdog((r.rank for r in ranks), self.cfg.hang_timeout,
                                self.cfg.startup_timeout, time.monotonic, self.cadence,
                                self.cfg.hang_floor),
                       self.resume_from,
                       recovery=Recovery(previous.failed_at, previous.detection, previous.marks)
                       if previous is not None and previous.failed_at is not None else None)

    async def _join_round(self, rank: RankInfo) -> None:
        """Multi-node, once a round is complete (no worker of any node is alive): the restart
        count is the group's, and the checkpoint is the one every node can resume from. One node
        of the group tidies the shared directory."""
        while self.policy.total < self.rendezvous.restarts:  # a node that joined late catches up
            self.policy.spend(time.monotonic())
        self.resume_from = await self.rendezvous.agree(self._select_checkpoint(tidy=rank.node_rank == 0))

    async def _launch(self) -> None:
        try:
            a = await self._next_attempt()
        except RendezvousFailed as exc:
            if exc.stop_signal is not None:
                self.stop_signal = exc.stop_signal
                self.fsm.transition(State.STOPPING, str(exc))
            else:
                self.fsm.transition(State.FAILED, f"rendezvous: {exc}")
            return
        except CheckpointError as exc:
            self._requeue = not isinstance(exc, CheckpointDirsDiffer)
            self.fsm.transition(State.FAILED, f"checkpoint_dir: {exc}")
            return
        if a is None:
            self._stop(self._stop_reason())
            return
        self.attempt = a
        self.retention.follow(a.resume_from.path if a.resume_from else None, tidy=a.ranks[0].node_rank == 0)
        # Off the loop and off the relaunch's path: read when the attempt fails (_progressed).
        a.listing = asyncio.ensure_future(self._list_checkpoints())
        a.errors = await self._error_dir(a)
        if self.rank_logs is not None:
            a.logs = await self.rank_logs.open(a.restart, a.ranks,
                                               self.log.bind(restart=a.restart, attempt=a.id))
        self.log.info("launching", restart=a.restart, attempt=a.id, master_addr=a.endpoint.addr,
                      master_port=a.endpoint.port, agent_store=a.endpoint.agent_store, num_workers=len(a.ranks),
                      resume_from=str(a.resume_from.path) if a.resume_from else None,
                      logs=str(a.logs.folder) if a.logs else None,
                      **daemon_usage())
        argv = self._argv(a)
        try:
            for rank in a.ranks:
                spec = WorkerSpec(rank, argv, self._env(a, rank),
                                  Routing.of(self.cfg, rank.local_rank).shown)
                log = self.log.bind(rank=rank.rank, restart=a.restart, attempt=a.id)
                worker = await spawn(spec, a.id, self.launcher, self.router, log)
                a.workers.append(worker)
                log.info("worker_started", pid=worker.pid)
            self._watch_progress(a)
        except OSError as exc:
            a.fail(Cause(rank.rank, "startup", f"spawn failed: {exc}", "spawn"), self.cfg.startup_window)
            self.fsm.transition(State.RECOVERING, f"rank {rank.rank}: spawn failed: {exc}")
            return
        a.started_at = time.monotonic()
        orphans.record(self.cfg.run_dir, a.workers, self.log)
        if self._stop_requested.is_set():
            self._stop(self._stop_reason())
        else:
            self.fsm.transition(State.RUNNING, "all workers started")

    def _watch_progress(self, a: Attempt) -> None:
        """Let the watchdog look at the ranks' collectives and I/O, now that they have pids."""
        pids = {w.rank: w.pid for w in a.workers}
        sockets = {r: self.sockets.path(a.id, r) for r in pids} if self.sockets else {}
        a.watchdog.look = Looker(sockets, pids, a.watchdog.last).look
        a.watchdog.on_collectives = lambda rank: self._collectives_moved(a, rank)
        a.watchdog.on_no_channel = lambda rank, why: self._no_channel(a, rank, why)
        a.watchdog.on_cadence = self._cadence_changed
        for rank, pid in pids.items():  # the kernel's OOM kills are counted per memory cgroup
            if (cgroup := procfs.memory_cgroup(pid)) is not None and (kills := procfs.oom_kills(cgroup)) is not None:
                a.oom_kills[rank] = (cgroup, kills)

    @staticmethod
    def _error_file(a: Attempt, rank: int) -> Path | None:
        """Where torchrun puts it when there is a log dir, else beside the attempt's diagnosis."""
        if a.logs is not None:
            return a.logs.error_file(rank)
        return a.errors / f"rank-{rank}.error.json" if a.errors is not None else None

    def _attempt_dir(self, a: Attempt) -> Path:
        """Where what the attempt's failure left is kept: stacks, error files."""
        return self.cfg.run_dir / "diagnoses" / self.run_id / f"attempt-{a.id}"

    async def _error_dir(self, a: Attempt) -> Path | None:
        """The attempt's folder for torchrun's error files (beside its diagnosis); None when it
        cannot be made (within ERROR_DIR_WAIT: a stalled run dir must not hold the launch): the
        ranks then get no error file, as under a torchrun without a log dir."""
        folder = self._attempt_dir(a)

        def make() -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            return folder.resolve()
        try:
            async with asyncio.timeout(ERROR_DIR_WAIT):
                return await blocking.in_thread(make, "error-dir")
        except (OSError, TimeoutError) as exc:
            self.log.warning("error_files_unavailable", attempt=a.id, path=str(folder),
                             reason=getattr(exc, "strerror", None) or str(exc)
                             or f"not made within {ERROR_DIR_WAIT:g} s")
            return None

    def _no_channel(self, a: Attempt, rank: int, why: str) -> None:
        """Said once per rank and run: such a rank is judged by its output and steps alone."""
        if rank not in self._no_channel_said:
            self._no_channel_said.add(rank)
            self.log.bind(rank=rank, restart=a.restart, attempt=a.id).info(
                "channel_unavailable", reason=why,
                judged_by="output, steps and I/O" if self.sockets else "output, steps and I/O (channel off)")

    def _select_checkpoint(self, tidy: bool = True) -> checkpoints.Checkpoint | None:
        """Runs only while no worker is alive: stale temporaries cannot be writes in progress.
        ``tidy``: remove them and prune old checkpoints (one node of a group does, in a shared
        directory)."""
        ckdir = self.cfg.checkpoint_dir
        try:
            for path in checkpoints.remove_stale_temporaries(ckdir) if tidy else ():
                self.log.warning("stale_temporary_removed", path=str(path))
        except OSError as exc:  # harmless: temporaries are never candidates
            self.log.warning("stale_temporary_not_removed", reason=str(exc))
        found = checkpoints.discover(ckdir)
        for bad in found.rejected:
            self.log.warning("checkpoint_rejected", path=str(bad.path), reason=bad.reason)
        if found.newest is None:
            self.log.info("checkpoint_selected", path=None, step=None,
                          reason=f"no intact checkpoint in {ckdir}: starting fresh")
            return None
        self.log.info("checkpoint_selected", path=str(found.newest.path), step=found.newest.step,
                      mtime=checkpoints.mtime(found.newest.path))
        if tidy:
            retention.prune(ckdir, self.cfg.keep_checkpoints, [found.newest.path], self.log)
        return found.newest

    def _argv(self, a: Attempt) -> tuple[str, ...]:
        if self.cfg.command:
            return self.cfg.command
        c = self.cfg
        first = a.id == 0 and a.restart == 0  # a node that rejoins a running job starts at attempt 0
        crash = (c.crash_at_step, c.crash_rank) if c.crash_at_step is not None and first else None
        return builtin_job.argv(epochs=c.epochs, steps=c.steps,
                                checkpoint_interval=c.checkpoint_interval, seed=c.seed,
                                checkpoint_dir=c.checkpoint_dir,
                                keep_checkpoints=c.keep_checkpoints,
                                resume_from=a.resume_from.path if a.resume_from else None,
                                crash=crash, jit_checkpoint=c.jit_checkpoint_timeout > 0)

    def _launcher_env(self) -> dict[str, str]:
        """What the ranks' environment is built on: the daemon's, then ``env`` from the config."""
        return {**os.environ, **self.cfg.env}

    def _env(self, a: Attempt, rank: RankInfo) -> dict[str, str]:
        base = self._launcher_env()
        if self.sockets is not None:  # the job's own size wins
            base.setdefault(FR_BUFFER, FR_ENTRIES)
        return envvars.for_rank(base, rank, a.endpoint,
                                run_id=self.run_id, restart=a.restart,
                                max_restarts=self.cfg.max_restarts,
                                checkpoint_dir=self.cfg.checkpoint_dir,
                                keep_checkpoints=self.cfg.keep_checkpoints,
                                resume_from=a.resume_from.path if a.resume_from else None,
                                rdzv_id=self.cfg.rdzv_id if self.rendezvous.multi_node else None,
                                channel=self.sockets.path(a.id, rank.rank) if self.sockets else None,
                                error_file=self._error_file(a, rank.rank), role=self.cfg.role,
                                virtual_local_rank=self.cfg.virtual_local_rank,
                                fast_exit=self.cfg.fast_failed_exit)

    # -- RUNNING --------------------------------------------------------------------------------
    async def _watch(self) -> None:
        a = self.attempt
        assert a is not None
        pending: set[asyncio.Future[Any]] = {w.exit for w in a.workers}
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        hang_wait = asyncio.create_task(a.watchdog.expired(a.alive))
        news_wait = asyncio.create_task(self.rendezvous.news())
        waiters = {stop_wait, hang_wait, news_wait}
        by_task = {w.exit: w for w in a.workers}
        try:
            while pending:
                done, pending = await asyncio.wait(pending | waiters,
                                                   return_when=asyncio.FIRST_COMPLETED)
                pending -= waiters
                exited = sorted((by_task[t] for t in done - waiters), key=lambda w: w.exited_at or 0)
                for worker in exited:
                    self._report_exit(a, worker)
                    if worker.exit.result() == 0:
                        a.watchdog.peer_exited()
                if (failed := first_to_fail(exited)) is not None:
                    cause, _ = self._rank_cause(a, failed)
                    assert cause is not None  # nothing is torn down yet
                    a.fail(cause, self.cfg.startup_window,
                           detection=time.monotonic() - (failed.exited_at or time.monotonic()))
                    why = f"exited with {failed.exit.result()}"
                    said = cause.summary()
                    self.fsm.transition(State.RECOVERING, f"rank {failed.rank} {why}"
                                                          + (f": {said}" if said != why else ""))
                    return
                if hang_wait in done:
                    hung = hang_wait.result()
                    if await self._exiting(a, hung):
                        waiters.discard(hang_wait)
                        hang_wait = asyncio.create_task(a.watchdog.expired(a.alive))
                        waiters.add(hang_wait)
                        continue
                    for h in hung:
                        self.log.bind(rank=h.rank, restart=a.restart, attempt=a.id).error(
                            "hang_detected", silent_for=round(h.silent_for, 3),
                            before_first_step=h.before_first_step,
                            timeout=round(a.watchdog.timeout, 3))
                    a.hung = [h.rank for h in hung]
                    d = await self._diagnose(a, "hung")
                    # The rank to blame: the diagnosis's first laggard, else the longest silent.
                    first = next((h for h in hung if d is not None and h.rank in d.laggards[:1]), hung[0])
                    why = f"no sign of progress for {first.silent_for:.1f} s"
                    a.fail(Cause(first.rank, "startup" if first.before_first_step else "hang",
                                 why, "diagnosis" if d is not None else "watchdog",
                                 where=self._stalled_at(d, first.rank)),
                           self.cfg.startup_window, hung_before_first_step=first.before_first_step,
                           detection=first.silent_for)
                    a.marks["diagnosis"] = time.monotonic()
                    self.fsm.transition(State.RECOVERING, f"rank {first.rank} hung: {why}")
                    return
                if stop_wait in done:
                    self._stop(self._stop_reason())
                    return
                if news_wait in done:
                    news = news_wait.result()
                    if news.kind == "store" and a.stepped:  # the ranks have met: they need it no more
                        self.log.warning("store_host_lost", attempt=a.id, reason=news.reason,
                                         action="training goes on; the next launch gets a new store")
                        waiters.discard(news_wait)
                        news_wait = asyncio.create_task(self.rendezvous.news())
                        waiters.add(news_wait)
                        continue
                    self._heard(a, news)
                    return
        finally:
            for task in waiters:
                task.cancel()
        await self.retention.finish(LISTING_TIMEOUT)
        self.fsm.transition(State.DONE, "all workers exited 0")

    def _heard(self, a: Attempt, news: News) -> None:
        """Another node's word ends this attempt: stop as it stops, or recover with it."""
        why = f"node {news.by_node}: {news.reason}" if news.by_node is not None else news.reason
        if news.kind == "stop":
            self.stop_signal = self.stop_signal or news.signal
            self._stop_requested.set()
            self.fsm.transition(State.STOPPING, why)
            return
        if news.kind == "store":  # free, unless the helper keeps dying: then it spends budget
            self._store_lost += 1
            if self._store_lost > MAX_FREE_STORE_ROUNDS:
                news = replace(news, kind="lost")
        a.news = news
        if news.kind not in FREE_ROUNDS:
            a.fail(Cause(-1 if news.rank is None else news.rank, "peer_lost", why, "news",
                         returncode=news.returncode), self.cfg.startup_window)
        self.fsm.transition(State.RECOVERING, why)

    def _stop(self, reason: str) -> None:
        """A stop request of this node's own: every other node of the round stops too."""
        self.rendezvous.announce("stop", reason, signal=self.stop_signal)
        self.fsm.transition(State.STOPPING, reason)

    def _report_exit(self, a: Attempt, worker: Worker) -> None:
        if worker.rank in a.reported:
            return
        a.reported.add(worker.rank)
        # The worker's last lines come before its exit, as far as EXIT_FLUSH_LINES go: under a
        # flood the backlog holds up to 16 MiB of lines, seconds to render, and the exit must
        # be acted on first (the rest follows in order, from the emitter).
        self.router.flush(EXIT_FLUSH_LINES)
        rc = worker.exit.result()
        log = self.log.bind(rank=worker.rank, restart=a.restart, attempt=a.id)
        fields: dict[str, Any] = dict(pid=worker.pid, returncode=rc,
                                      runtime=round((worker.exited_at or time.monotonic())
                                                    - worker.started, 3))
        if rc < 0:
            fields["signal"] = signal.Signals(-rc).name
        (log.info if rc == 0 else log.warning)("worker_exited", **fields)

    # -- RECOVERING / STOPPING ------------------------------------------------------------------
    async def _teardown(self, why: str, let_exit: float = 0.0) -> None:
        """Stop the attempt's workers; first give them ``let_exit`` seconds to exit by themselves."""
        a = self.attempt
        if a is None:  # stopped before the first launch
            return
        # Survivors of a dead peer save their last completed step, then exit on their own; a
        # SIGTERM now would kill a script that does not catch it mid-save. Only ranks that armed
        # such a save are waited for: any other script would only cost the wait. Those that did
        # so while the failure was diagnosed count as having exited on their own too.
        armed = [w for w in a.workers if w.rank in a.jit_armed
                 and (w.alive or (w.exited_at or 0.0) >= (a.failed_at or 0.0))]
        if let_exit and armed:
            await wait_exits([w for w in a.workers if w.alive], let_exit, self._kill_now)
            self.log.info("jit_checkpoint_wait", attempt=a.id, timeout=let_exit,
                          exited_on_their_own=[w.rank for w in armed if not w.alive],
                          still_alive=a.alive())
        a.marks["jit_wait"] = time.monotonic()
        if why == "recovery":  # only a failure is explained from it
            a.torn_down = {r: a.stderr[r].snapshot() if r in a.stderr else () for r in a.alive()}
        report = await stop(a.workers, self.cfg.grace_period, self._kill_now)
        a.marks["teardown"] = time.monotonic()
        if a.logs is not None:  # every line of the workers is in now
            a.logs.close()
        for w in sorted((w for w in a.workers if not w.alive), key=lambda w: w.exited_at or 0):
            self._report_exit(a, w)  # those that exited since the failure, and those signalled
        self.log.info("teardown", why=why, attempt=a.id, seconds=round(report.seconds, 3),
                      terminated=report.terminated, killed=report.killed)
        if report.stuck:
            self.log.error("workers_stuck", attempt=a.id, ranks=report.stuck,
                           reason="still alive after SIGKILL (uninterruptible sleep?)")
        await orphans.sweep(a.workers, self.log)
        if self.sockets is not None:
            self.sockets.forget(a.id)

    async def _recover(self) -> None:
        a = self.attempt
        assert a is not None
        if a.news is not None and a.news.kind in FREE_ROUNDS:  # not the job's failure
            await self._teardown("new round")
            if self._stop_requested.is_set():
                self._stop(self._stop_reason())
            else:
                self.fsm.transition(State.LAUNCHING, f"{FREE_ROUNDS[a.news.kind]} (no restart spent)")
            return
        assert a.failure is not None
        if a.news is None:  # ours: the other nodes hear of it now, not after the teardown
            self.rendezvous.announce("restart", a.failure.cause.summary(), rank=a.failure.rank,
                                     returncode=a.failure.returncode)
        died = a.failure.returncode is not None  # a rank exited: not a hang, not a failed spawn
        d = None
        if a.news is None and died:
            d = await self._diagnose(a, f"rank {a.failure.rank} failed")
            await self._await_root(a)
            a.marks["diagnosis"] = time.monotonic()
        await self._teardown("recovery", self.cfg.jit_checkpoint_timeout if died else 0.0)
        before = a.resume_from
        try:  # multi-node: chosen with the other nodes when the next round is complete
            if not self.rendezvous.multi_node:
                self.resume_from = self._select_checkpoint()
        except CheckpointError as exc:
            self.fsm.transition(State.FAILED, f"checkpoint_dir: {exc}")
            return
        newer = self.resume_from is not None and (before is None or self.resume_from.step > before.step)
        explained = self._explain(a, d)
        progressed = await self._progressed(a)
        failure = replace(a.failure, cause=explained.root, progressed=progressed,
                          at_startup=a.failure.at_startup and not newer and progressed is not True)
        if self._stop_requested.is_set():
            self._stop(self._stop_reason())
            return
        if (vindicated := self._judge_fallback(failure)) is not None:
            self._requeue = False
            self.fsm.transition(State.FAILED, vindicated)
            return
        decision = self.policy.decide(failure, time.monotonic())
        if decision.crash_loop and a.resume_from is not None and self._fall_back(a.resume_from, failure):
            self.fsm.transition(State.LAUNCHING, f"checkpoint step {a.resume_from.step} set aside: "
                                                 f"resuming from step {self.resume_from.step} "
                                                 "(no restart spent)")
        elif not decision.relaunch:
            self._requeue = decision.requeue
            self.fsm.transition(State.FAILED, decision.reason)
        elif decision.delay > 0 and await self._backoff(decision.delay):
            self._stop(self._stop_reason())
        else:
            self.policy.spend(time.monotonic())
            self.fsm.transition(State.LAUNCHING, decision.reason)

    async def _await_root(self, a: Attempt) -> None:
        """The first rank to fail died of a lost peer: the root is likely alive and about to fail
        on its own. It gets ``root_cause_wait`` seconds before the teardown's signal hides its error."""
        assert a.failure is not None
        live = [w for w in a.workers if w.alive]
        # Multi-node: the root is as likely on another node, whose daemon explains it; a partition
        # leaves ranks waiting here, not failing, and the wait would delay every node's recovery.
        if not (a.failure.cause.knock_on and live and self.cfg.root_cause_wait > 0) or self.rendezvous.multi_node:
            return
        t0 = time.monotonic()
        await wait_exits(live, self.cfg.root_cause_wait, self._kill_now,
                         until=lambda w: w.exit.result() != 0 and not self._rank_cause(a, w)[0].knock_on)  # type: ignore[union-attr]
        self.log.info("root_cause_wait", attempt=a.id, timeout=self.cfg.root_cause_wait,
                      seconds=round(time.monotonic() - t0, 3),
                      exited=[w.rank for w in live if not w.alive], still_alive=a.alive())

    def _rank_cause(self, a: Attempt, w: Worker) -> tuple[Cause | None, str | None]:
        """The cause of ``w``'s failure, from what it left (None: a rank the teardown stopped
        that had not failed), and why its error file could not be used (None when it could, or
        was not written)."""
        path = self._error_file(a, w.rank)
        error_file = causes.read_error_file(path, a.launched_wall) if path else causes.ErrorFile(None, None)
        if w.rank in a.torn_down:  # what it said before the signal: an exception it had raised
            return causes.raised(w.rank, a.stderr_text(w.rank, a.torn_down[w.rank]), error_file, w.exit.result(),
                                 w.exited_at or 0.0), error_file.note
        oom = (cg := a.oom_kills.get(w.rank)) is not None and (procfs.oom_kills(cg[0]) or 0) > cg[1]
        return causes.of_rank(w.rank, w.exit.result(), a.stderr_text(w.rank), error_file, oom,
                              w.exited_at or 0.0), error_file.note

    def _explain(self, a: Attempt, d: diagnosis.Diagnosis | None) -> Explanation:
        """The attempt's root cause and its knock-ons, said once (``failure_explained``)."""
        assert a.failure is not None
        failed, notes = [], []
        for w in a.workers:
            if w.alive or w.exit.result() == 0:
                continue
            cause, note = self._rank_cause(a, w)
            if cause is not None:
                failed.append(cause)
            if note:
                notes.append(f"rank {w.rank}: {note}")
        if a.failure.returncode is None or a.news is not None or not failed:
            # a hang, a failed spawn, another node's failure (or, had every rank that exited been
            # torn down without a word of its own, the first failure as it was seen)
            failed.append(replace(a.failure.cause, at=a.failed_at or 0.0))
        # Live ranks the failure's diagnosis found outside the collective their peers died in:
        # the laggards, then any that gave its stacks or collectives and was in none.
        suspects = [] if d is None else d.laggards + sorted(
            r for r, rep in d.reports.items() if r not in d.laggards
            and (rep.stacks is not None or rep.trace is not None) and not rep.in_collective())
        stalled = [Cause(r, "hang", "alive outside the collective its failed peers were in",
                         "diagnosis", where=self._stalled_at(d, r)) for r in suspects if r in a.torn_down]
        e = causes.explain(failed, stalled, notes)
        self.log.bind(attempt=a.id, restart=a.restart).error(
            "failure_explained", rank=e.rank, cause=e.root.cause, exception=e.root.exception,
            where=e.root.where, message=e.root.message, source=e.root.source,
            returncode=e.root.returncode, knock_on=list(e.knock_on), also_failed=list(e.also_failed),
            notes=list(e.notes))
        return e

    @staticmethod
    def _stalled_at(d: diagnosis.Diagnosis | None, rank: int) -> str | None:
        if d is None or rank not in d.reports:
            return None
        frame = flight.innermost_own(d.reports[rank].frames)
        return str(frame) if frame is not None else None

    async def _progressed(self, a: Attempt) -> bool | None:
        """Did ``a`` get further than every attempt before it: a higher step, or a checkpoint
        written? None when the job shows the daemon neither steps nor checkpoints, or its
        checkpoint directory cannot be listed within LISTING_TIMEOUT."""
        before, self._high_step = self._high_step, max(
            (s for s in (self._high_step, a.high_step) if s is not None), default=None)
        if a.high_step is not None and (before is None or a.high_step > before):
            return True
        try:
            async with asyncio.timeout(LISTING_TIMEOUT):
                then = await a.listing if a.listing is not None else None
                now = await self._list_checkpoints()
        except TimeoutError:
            return None
        wrote = now.wrote_since(then) if then is not None else None
        if wrote is not False:
            return wrote
        if self._reports_steps or not (now.empty and then.empty):
            return False
        return None

    async def _exiting(self, a: Attempt, hung: list[Hang]) -> bool:
        """Every silent rank is in its interpreter's last steps of exit (torch's handlers are
        gone: a finished job can spend seconds there on a loaded machine) and none was waited
        for before: their clocks start again, once. A rank that then stays there is hung."""
        if self.sockets is None or any(h.rank in a.exit_waited for h in hung):
            return False
        answers = await asyncio.gather(*(exiting(self.sockets.path(a.id, h.rank)) for h in hung))
        if not all(answers):
            return False
        a.exit_waited.update(h.rank for h in hung)
        for h in hung:
            a.watchdog.output(h.rank)
        self.log.warning("hang_deferred", attempt=a.id, ranks=[h.rank for h in hung],
                         silent_for=round(max(h.silent_for for h in hung), 3),
                         reason="exiting: torch's handlers are gone; one more limit to exit")
        return True

    def _list_checkpoints(self) -> Awaitable[checkpoints.Listing]:
        return blocking.in_thread(lambda: checkpoints.listing(self.cfg.checkpoint_dir), "checkpoint-lister")

    async def _diagnose(self, a: Attempt, why: str) -> diagnosis.Diagnosis | None:
        """Before any signal: every live rank's stacks and collectives; the laggards, named."""
        live = {w.rank: w.pid for w in a.workers if w.alive}
        if not live:
            return None
        sockets = {r: self.sockets.path(a.id, r) for r in live} if self.sockets else {}
        t0 = time.monotonic()
        d = diagnosis.diagnose(await diagnosis.collect(sockets, live, outside=bool(a.hung)))
        directory = self._attempt_dir(a)
        unwritten = await diagnosis.write(directory, d, a.id, why)
        fields: dict[str, Any] = dict(
            attempt=a.id, laggards=d.laggards, summary=d.summary,
            stacks=None if unwritten else os.path.abspath(directory), frames=d.frames(),
            unanswered={r: rep.problems for r, rep in d.reports.items() if rep.stacks is None},
            seconds=round(time.monotonic() - t0, 3))
        if unwritten:
            fields["stacks_error"] = unwritten
        if a.hung:
            self.log.error("hang_diagnosed", **fields)
        elif a.failure is not None and any(rep.stacks is not None for rep in d.reports.values()):
            self.log.warning("failure_diagnosed", rank=a.failure.rank, **fields)  # else: nothing to say
        return d

    def _fall_back(self, bad: checkpoints.Checkpoint, failure: Failure) -> bool:
        """The group failed the same way at start-up twice after resuming from ``bad``: set it
        aside (renamed, never deleted) and resume from the next older intact checkpoint, without
        spending a restart. True if there is one."""
        try:
            aside = checkpoints.set_aside(bad)
        except OSError as exc:
            self.log.warning("checkpoint_set_aside_failed", path=str(bad.path), reason=str(exc))
            return False
        self.log.warning("checkpoint_set_aside", path=str(bad.path), moved_to=str(aside),
                         step=bad.step, reason=f"two attempts failed at start-up after resuming "
                                               f"from it: {failure.cause.summary()}")
        older = self._select_checkpoint()
        if older is None:
            self._put_back(SetAside(bad, aside), "no older intact checkpoint to fall back to")
            return False
        self.resume_from = older
        self._set_aside = SetAside(bad, aside)
        return True

    def _judge_fallback(self, failure: Failure) -> str | None:
        """The first failure after a fallback settles it. At start-up again, from an older file
        too: the file was not the cause, so it gets its name back and the run fails (a reason is
        returned). Otherwise the older checkpoint worked and the bad one stays aside."""
        pending, self._set_aside = self._set_aside, None
        if pending is None or not failure.at_startup:
            return None
        self._put_back(pending, "the group fails at start-up from an older checkpoint too: "
                                "the file was not the cause")
        return (f"crash loop: attempts failed at start-up from checkpoint step {pending.bad.step} "
                f"and from older ones: {failure.cause.summary()}")

    def _put_back(self, pending: SetAside, why: str) -> None:
        try:
            checkpoints.put_back(pending.bad, pending.aside)
        except OSError as exc:
            self.log.warning("checkpoint_put_back_failed", path=str(pending.bad.path),
                             moved_to=str(pending.aside), reason=str(exc))
            return
        self.log.warning("checkpoint_put_back", path=str(pending.bad.path), reason=why)

    async def _backoff(self, delay: float) -> bool:
        """Wait ``delay`` before a relaunch; True if a stop request cut the wait short."""
        self.log.info("restart_backoff", seconds=delay, restart=self.restarts)
        try:
            async with asyncio.timeout(delay):
                await self._stop_requested.wait()
        except TimeoutError:
            return False
        return True

    async def _shutdown(self) -> None:
        await self._teardown("shutdown")
        self.fsm.transition(State.STOPPED, "all workers stopped")


@dataclass(frozen=True)
class SetAside:
    """A checkpoint a fallback renamed aside, until the attempt after it settles the question."""

    bad: checkpoints.Checkpoint
    aside: Path


def daemon_usage() -> dict[str, int]:
    """The daemon's own footprint: peak RSS and open file descriptors (leak checks)."""
    return {"daemon_max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "daemon_open_fds": len(os.listdir("/proc/self/fd"))}
