"""The daemon's error hierarchy. Each maps to one exit code at the edge (``cli``)."""


class SupervisorError(Exception):
    """Base class: an error the daemon reports in one line and exits on."""

    exit_code = 70  # EX_SOFTWARE: a bug, not the user's input


class ConfigError(SupervisorError):
    """Bad configuration or command line. The message names the key and the value."""

    exit_code = 2


class CheckpointError(SupervisorError):
    """A file in the checkpoint directory cannot be used; the message says why."""

    exit_code = 1


class TransitionError(SupervisorError):
    """An illegal state transition: always a bug in the supervisor."""
