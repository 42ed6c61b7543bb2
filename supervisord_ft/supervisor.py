"""The supervisor loop: owns the state machine, the worker group and the restart accounting.

One coroutine decides everything. While the group runs it awaits the first of (a worker exit,
a hang, a stop request) with ``asyncio.wait(FIRST_COMPLETED)``; nothing polls. Signal handlers
only record the request; output readers only stamp progress clocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import signal
import sys
import time
from typing import Any

from . import checkpoints
from .config import Config, as_dict
from .errors import CheckpointError
from .fsm import State, StateMachine
from .output import OutputRouter, Source
from .rendezvous import Endpoint, LocalRendezvous, RankInfo, Rendezvous
from .restarts import Failure, RestartPolicy
from .watchdog import Watchdog
from .workers import Launcher, SubprocessLauncher, Worker, WorkerSpec, spawn, stop

EXIT_CODES = {State.DONE: 0, State.FAILED: 1}
STEP_EVENT = "step"


class Supervisor:
    def __init__(self, cfg: Config, log: Any, launcher: Launcher | None = None,
                 rendezvous: Rendezvous | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.launcher = launcher or SubprocessLauncher()
        self.rendezvous = rendezvous or LocalRendezvous(cfg.master_addr, cfg.master_port)
        self.fsm = StateMachine(on_change=self._log_transition)
        self.policy = RestartPolicy(cfg.max_restarts, cfg.restart_window, cfg.restart_backoff,
                                    cfg.restart_backoff_max, cfg.no_retry_exit_codes)
        self.router = OutputRouter(cfg.max_line_bytes, on_line=self._on_line, on_json=self._on_json)
        self.workers: list[Worker] = []
        self.resume_from: checkpoints.Checkpoint | None = None
        self.stop_signal: int | None = None
        self._stop_requested = asyncio.Event()
        self._kill_now = asyncio.Event()
        # The current attempt, reset at each launch.
        self.watchdog: Watchdog | None = None
        self.stepped = False
        self.failure: Failure | None = None
        self.failed_at: float | None = None  # when the last failure was detected
        self.last_stderr: dict[int, bytes] = {}

    @property
    def restarts(self) -> int:
        return self.policy.total

    # -- signals and output: record, nothing else --------------------------------------------
    def request_stop(self, sig: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = sig
            self._stop_requested.set()
        else:
            self._kill_now.set()

    def _on_line(self, source: Source, raw: bytes) -> None:
        if source.restart != self.restarts or self.watchdog is None:
            return  # a late line of a torn-down attempt
        self.watchdog.output(source.rank)
        if source.stream == "stderr" and raw.strip():
            self.last_stderr[source.rank] = raw

    def _on_json(self, source: Source, fields: dict[str, Any]) -> None:
        if fields.get("event") != STEP_EVENT or source.restart != self.restarts:
            return
        if self.watchdog is not None:
            self.watchdog.step(source.rank)
        if not self.stepped:
            self.stepped = True
            if self.failed_at is not None:
                source.log.info("recovered", step=fields.get("step"),
                                seconds=round(time.monotonic() - self.failed_at, 3))

    # -- the loop -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig)
        emitter = asyncio.create_task(self.router.run(), name="output-emitter")
        ticker = asyncio.create_task(self._status_ticker(), name="status")
        self.log.info("supervisor_start", pid=os.getpid(), python=sys.executable,
                      loop=type(loop).__module__.split(".")[0], config=as_dict(self.cfg))
        steps = {
            State.LAUNCHING: self._launch,
            State.RUNNING: self._watch,
            State.RECOVERING: self._recover,
            State.STOPPING: self._shutdown,
        }
        try:
            try:
                self.resume_from = self._select_checkpoint()
            except CheckpointError as exc:
                self.fsm.transition(State.FAILED, f"checkpoint_dir: {exc}")
            while not self.fsm.state.terminal:
                await steps[self.fsm.state]()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if any(w.alive for w in self.workers):  # only on an internal error: never orphan
                await stop(self.workers, 0, self._kill_now)
            ticker.cancel()
            emitter.cancel()
            self.router.flush()
        code = EXIT_CODES.get(self.fsm.state, 128 + (self.stop_signal or 0))
        self.log.info("supervisor_exit", state=self.fsm.state.value, restarts=self.restarts,
                      exit_code=code)
        return code

    def _log_transition(self, before: State, after: State, reason: str) -> None:
        self.log.info("state_changed", **{"from": before.value, "to": after.value},
                      restart=self.restarts, reason=reason)

    def _stop_reason(self) -> str:
        return f"signal {signal.Signals(self.stop_signal or 0).name}"

    async def _status_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval)
            self.log.info("status", state=self.fsm.state.value, restarts=self.restarts,
                          alive=[w.rank for w in self.workers if w.alive],
                          output_lines=self.router.lines, **daemon_usage())

    # -- LAUNCHING ------------------------------------------------------------------------------
    async def _launch(self) -> None:
        endpoint, ranks = self.rendezvous.next_round(self.restarts, self.cfg.num_workers)
        self.log.info("launching", restart=self.restarts, master_addr=endpoint.addr,
                      master_port=endpoint.port, num_workers=len(ranks),
                      resume_from=str(self.resume_from.path) if self.resume_from else None,
                      **daemon_usage())
        self.workers, self.stepped, self.last_stderr = [], False, {}
        self.watchdog = Watchdog((r.rank for r in ranks), self.cfg.hang_timeout,
                                 self.cfg.startup_timeout, time.monotonic)
        try:
            for rank in ranks:
                spec = WorkerSpec(rank, self._argv(), self._env(rank, endpoint))
                log = self.log.bind(rank=rank.rank, restart=self.restarts)
                worker = await spawn(spec, self.restarts, self.launcher, self.router, log)
                self.workers.append(worker)
                log.info("worker_started", pid=worker.pid)
        except OSError as exc:
            self._fail(rank.rank, None, f"spawn failed: {exc}")
            self.fsm.transition(State.RECOVERING, f"rank {rank.rank}: spawn failed: {exc}")
            return
        if self._stop_requested.is_set():
            self.fsm.transition(State.STOPPING, self._stop_reason())
        else:
            self.fsm.transition(State.RUNNING, "all workers started")

    def _select_checkpoint(self) -> checkpoints.Checkpoint | None:
        """Runs only while no worker is alive: stale temporaries cannot be writes in progress."""
        ckdir = self.cfg.checkpoint_dir
        try:
            for path in checkpoints.remove_stale_temporaries(ckdir):
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
        self.log.info("checkpoint_selected", path=str(found.newest.path), step=found.newest.step)
        try:
            for path in checkpoints.prune(ckdir, self.cfg.keep_checkpoints, protect=[found.newest.path]):
                self.log.info("checkpoint_pruned", path=str(path))
        except OSError as exc:  # old files stay; nothing is lost
            self.log.warning("checkpoint_prune_failed", reason=str(exc))
        return found.newest

    def _argv(self) -> tuple[str, ...]:
        if self.cfg.command:
            return self.cfg.command
        c = self.cfg
        argv = [sys.executable, "-m", "worker", "--epochs", str(c.epochs), "--steps", str(c.steps),
                "--checkpoint_interval", str(c.checkpoint_interval), "--seed", str(c.seed),
                "--checkpoint_dir", str(c.checkpoint_dir.resolve()),
                "--keep_checkpoints", str(c.keep_checkpoints)]
        if c.crash_at_step is not None and self.restarts == 0:
            argv += ["--crash_at_step", str(c.crash_at_step), "--crash_rank", str(c.crash_rank)]
        if self.resume_from is not None:
            argv += ["--resume_from_checkpoint", str(self.resume_from.path.resolve())]
        return tuple(argv)

    def _env(self, rank: RankInfo, endpoint: Endpoint) -> dict[str, str]:
        env = {**os.environ, **self.cfg.env}
        env.update(
            RANK=str(rank.rank), LOCAL_RANK=str(rank.local_rank), GROUP_RANK=str(rank.node_rank),
            WORLD_SIZE=str(rank.world_size), LOCAL_WORLD_SIZE=str(rank.local_world_size),
            MASTER_ADDR=endpoint.addr, MASTER_PORT=str(endpoint.port),
            TORCHELASTIC_RESTART_COUNT=str(self.restarts),
            TORCHELASTIC_MAX_RESTARTS=str(self.cfg.max_restarts),
            SUPERVISORD_FT_RESTART_COUNT=str(self.restarts),
            SUPERVISORD_FT_CHECKPOINT_DIR=str(self.cfg.checkpoint_dir.resolve()),
            SUPERVISORD_FT_KEEP_CHECKPOINTS=str(self.cfg.keep_checkpoints),
            PYTHONUNBUFFERED="1",  # a Python worker's lines reach us as they are printed
        )
        env.pop("SUPERVISORD_FT_RESUME_FROM", None)
        if self.resume_from is not None:
            env["SUPERVISORD_FT_RESUME_FROM"] = str(self.resume_from.path.resolve())
        return env

    # -- RUNNING --------------------------------------------------------------------------------
    async def _watch(self) -> None:
        by_task = {w.exit: w for w in self.workers}
        pending = set(by_task)
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        assert self.watchdog is not None
        hang_wait = asyncio.create_task(
            self.watchdog.expired(lambda: [w.rank for w in self.workers if w.alive]))
        waiters = {stop_wait, hang_wait}
        try:
            while pending:
                done, pending = await asyncio.wait(pending | waiters,
                                                   return_when=asyncio.FIRST_COMPLETED)
                pending -= waiters
                failed = None
                for task in done - waiters:
                    worker = by_task[task]
                    self._report_exit(worker)
                    if task.result() != 0 and failed is None:
                        failed = worker
                if failed is not None:
                    rc = failed.exit.result()
                    self._fail(failed.rank, rc, self.last_stderr.get(failed.rank, b"").decode(
                        "utf-8", "replace").strip()[:500])
                    self.fsm.transition(State.RECOVERING, f"rank {failed.rank} exited with {rc}")
                    return
                if hang_wait in done:
                    hung = hang_wait.result()
                    for h in hung:
                        self.log.bind(rank=h.rank, restart=self.restarts).error(
                            "hang_detected", silent_for=round(h.silent_for, 3),
                            before_first_step=h.before_first_step)
                    first = hung[0]
                    why = f"no output for {first.silent_for:.1f} s"
                    # No seconds in the signature: two identical hangs must compare equal.
                    self._fail(first.rank, None, "hang before the first step"
                               if first.before_first_step else "hang")
                    self.fsm.transition(State.RECOVERING, f"rank {first.rank} hung: {why}")
                    return
                if stop_wait in done:
                    self.fsm.transition(State.STOPPING, self._stop_reason())
                    return
        finally:
            for task in waiters:
                task.cancel()
        self.fsm.transition(State.DONE, "all workers exited 0")

    def _fail(self, rank: int, returncode: int | None, last_error: str) -> None:
        self.failed_at = time.monotonic()
        self.failure = Failure(rank, returncode, last_error, self.stepped)

    def _report_exit(self, worker: Worker) -> None:
        self.router.flush()  # the worker's last lines come before its exit
        rc = worker.exit.result()
        log = self.log.bind(rank=worker.rank, restart=self.restarts)
        fields: dict[str, Any] = dict(pid=worker.pid, returncode=rc,
                                      runtime=round(time.monotonic() - worker.started, 3))
        if rc < 0:
            fields["signal"] = signal.Signals(-rc).name
        (log.info if rc == 0 else log.warning)("worker_exited", **fields)

    # -- RECOVERING / STOPPING ------------------------------------------------------------------
    async def _teardown(self, why: str) -> None:
        live = [w for w in self.workers if w.alive]
        report = await stop(self.workers, self.cfg.grace_period, self._kill_now)
        for w in live:
            if not w.alive:
                self._report_exit(w)
        self.log.info("teardown", why=why, seconds=round(report.seconds, 3),
                      terminated=report.terminated, killed=report.killed)
        if report.stuck:
            self.log.error("workers_stuck", ranks=report.stuck,
                           reason="still alive after SIGKILL (uninterruptible sleep?)")

    async def _recover(self) -> None:
        await self._teardown("recovery")
        before = self.resume_from
        try:
            self.resume_from = self._select_checkpoint()
        except CheckpointError as exc:
            self.fsm.transition(State.FAILED, f"checkpoint_dir: {exc}")
            return
        assert self.failure is not None
        newer = self.resume_from is not None and (before is None or self.resume_from.step > before.step)
        failure = dataclasses.replace(self.failure, progressed=self.failure.progressed or newer)
        decision = self.policy.decide(failure, time.monotonic())
        if self._stop_requested.is_set():
            self.fsm.transition(State.STOPPING, self._stop_reason())
        elif not decision.relaunch:
            self.fsm.transition(State.FAILED, decision.reason)
        elif decision.delay > 0 and await self._backoff(decision.delay):
            self.fsm.transition(State.STOPPING, self._stop_reason())
        else:
            self.fsm.transition(State.LAUNCHING, decision.reason)

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


def daemon_usage() -> dict[str, int]:
    """The daemon's own footprint: peak RSS and open file descriptors (leak checks)."""
    return {"daemon_max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "daemon_open_fds": len(os.listdir("/proc/self/fd"))}
