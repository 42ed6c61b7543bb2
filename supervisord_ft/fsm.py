"""The worker group's state machine: every allowed transition in one table.

The supervisor loop is the only caller of :meth:`StateMachine.transition`; everything else
reports to the loop. An illegal transition is a bug and raises :class:`TransitionError`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import TransitionError


class State(enum.Enum):
    LAUNCHING = "LAUNCHING"    # spawning the group (first start or relaunch)
    RUNNING = "RUNNING"        # every worker spawned; watching exits, output and signals
    RECOVERING = "RECOVERING"  # a worker failed: tearing down, choosing a checkpoint
    STOPPING = "STOPPING"      # SIGINT/SIGTERM received: graceful teardown
    DONE = "DONE"              # every worker exited 0
    FAILED = "FAILED"          # the restart budget is spent
    STOPPED = "STOPPED"        # shut down on request

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


TRANSITIONS: dict[State, frozenset[State]] = {
    # LAUNCHING -> FAILED: the checkpoint directory cannot be read at start-up.
    State.LAUNCHING: frozenset({State.RUNNING, State.RECOVERING, State.STOPPING, State.FAILED}),
    State.RUNNING: frozenset({State.DONE, State.RECOVERING, State.STOPPING}),
    State.RECOVERING: frozenset({State.LAUNCHING, State.FAILED, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.STOPPED: frozenset(),
}


@dataclass
class StateMachine:
    """Holds the current state and the history; ``on_change`` logs each transition."""

    on_change: Callable[[State, State, str], None]
    state: State = State.LAUNCHING
    history: list[State] = field(default_factory=lambda: [State.LAUNCHING])

    def transition(self, to: State, reason: str = "") -> None:
        if to not in TRANSITIONS[self.state]:
            raise TransitionError(f"illegal transition {self.state.value} -> {to.value}")
        before, self.state = self.state, to
        self.history.append(to)
        self.on_change(before, to, reason)
