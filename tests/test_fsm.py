import pytest

from supervisord_ft.errors import TransitionError
from supervisord_ft.fsm import TRANSITIONS, State, StateMachine


def test_every_state_has_a_row_and_terminal_states_have_no_exit():
    assert set(TRANSITIONS) == set(State)
    assert {s for s in State if s.terminal} == {State.DONE, State.FAILED, State.STOPPED}


def test_a_crash_and_recovery_path_is_allowed_and_every_transition_is_reported():
    seen = []
    fsm = StateMachine(on_change=lambda a, b, why: seen.append((a, b, why)))
    for to in (State.RUNNING, State.RECOVERING, State.LAUNCHING, State.RUNNING, State.DONE):
        fsm.transition(to, "because")
    assert fsm.state is State.DONE
    assert seen[0] == (State.LAUNCHING, State.RUNNING, "because") and len(seen) == 5
    assert fsm.history[0] is State.LAUNCHING and fsm.history[-1] is State.DONE


@pytest.mark.parametrize("path", [
    [State.DONE],                                  # nothing ran
    [State.RUNNING, State.LAUNCHING],              # relaunch without recovery
    [State.RUNNING, State.DONE, State.RUNNING],    # leave a terminal state
    [State.RUNNING, State.STOPPING, State.RUNNING],
    [State.RUNNING, State.RECOVERING, State.DONE],
])
def test_illegal_transitions_raise_and_leave_the_state_unchanged(path):
    fsm = StateMachine(on_change=lambda *a: None)
    *legal, illegal = path
    for to in legal:
        fsm.transition(to)
    with pytest.raises(TransitionError, match=f"-> {illegal.value}"):
        fsm.transition(illegal)
    assert fsm.state is (legal[-1] if legal else State.LAUNCHING)
