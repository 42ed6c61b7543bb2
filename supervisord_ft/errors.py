"""The daemon's error hierarchy and its exit codes, each named once.

Errors are mapped to exit codes at the edge (``cli``); :data:`EXIT_CODES` is the one table that
``--help``, docs/reference.md and the loop's final state all read.
"""

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# FAILED, and a rerun would fail the same way: a requeue policy (SLURM, a Kubernetes Job's
# podFailurePolicy) should key on it and not requeue.
EXIT_NO_REQUEUE = 3
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug, not the user's input
EXIT_SIGNAL_BASE = 128  # a graceful stop on signal n exits 128 + n, as a shell reports it

EXIT_CODES: tuple[tuple[str, str], ...] = (
    (str(EXIT_DONE), "DONE: every worker exited 0"),
    (str(EXIT_FAILED), "FAILED: a worker failed and no relaunch may follow (`max_restarts` spent, "
                       "an unlistable `checkpoint_dir`); a requeue may succeed"),
    (str(EXIT_NO_REQUEUE), "FAILED, do not requeue: a rerun would fail the same way (a "
                           "deterministic failure, `max_stalled_attempts` without progress, a "
                           "crash loop, a `no_retry_exit_codes` code, multi-node checkpoint dirs "
                           "with no step in common); the reason names the cause"),
    (str(EXIT_USAGE), "usage or configuration error (one line on stderr naming the key), or "
                      "`checkpoint_dir` already in use by another daemon (the line names the "
                      "directory and its pid); nothing was started"),
    ("129 / 130 / 131 / 143", "stopped gracefully after SIGHUP / SIGINT / SIGQUIT / SIGTERM "
                              "(128 + the signal number)"),
    (str(EXIT_INTERNAL), "internal error (a bug: please report it)"),
)


class SupervisorError(Exception):
    """Base class: an error the daemon reports in one line and exits on."""

    exit_code = EXIT_INTERNAL


class ConfigError(SupervisorError):
    """Bad configuration or command line. The message names the key and the value."""

    exit_code = EXIT_USAGE


class ReaderError(SupervisorError):
    """`status` or `report` cannot do its work: the run dir holds no run (or not the one asked
    for), or the report's optional dependency is not installed."""

    exit_code = EXIT_USAGE


class CheckpointError(Exception):
    """A checkpoint file, or the checkpoint directory, cannot be used; the message says why.

    It carries no exit code: the daemon ends the run FAILED on an unlistable directory, the
    built-in worker refuses to resume (its exit 2); each decides at its own edge.
    """


class CheckpointDirsDiffer(CheckpointError):
    """Multi-node: no checkpoint step is held by every node (their checkpoint dirs differ); no
    rerun can fix that, so the run ends with the do-not-requeue exit code."""


class TransitionError(SupervisorError):
    """An illegal state transition: always a bug in the supervisor."""
