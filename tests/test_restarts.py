"""The restart policy on its own: budget, window, backoff, crash loops, no-retry codes."""

from supervisord_ft.restarts import Failure, RestartPolicy


def crash(progressed: bool = True, code: int = 1, error: str = "boom") -> Failure:
    return Failure(rank=0, returncode=code, last_error=error, progressed=progressed)


def policy(max_restarts: int = 3, window: float = 0, backoff: float = 1, cap: float = 30,
           no_retry: tuple[int, ...] = ()) -> RestartPolicy:
    return RestartPolicy(max_restarts, window, backoff, cap, no_retry)


def test_budget_counts_relaunches_and_backoff_doubles_from_the_second():
    p = policy(max_restarts=4, backoff=1, cap=3)
    decisions = [p.decide(crash(), now=t) for t in range(5)]
    assert [d.relaunch for d in decisions] == [True, True, True, True, False]
    assert [d.delay for d in decisions[:4]] == [0, 1, 2, 3]
    assert p.total == 4 and "max_restarts (4) in this run" in decisions[-1].reason


def test_window_forgets_old_restarts():
    p = policy(max_restarts=1, window=10)
    assert p.decide(crash(), now=0).relaunch
    assert not p.decide(crash(), now=5).relaunch  # second within 10 s
    assert p.decide(crash(), now=20).relaunch  # the first fell out of the window
    assert p.total == 2


def test_same_failure_twice_without_progress_is_a_crash_loop():
    p = policy(max_restarts=10)
    assert p.decide(crash(progressed=False, error="ImportError: x"), now=0).relaunch
    d = p.decide(crash(progressed=False, error="ImportError: x"), now=1)
    assert not d.relaunch and "crash loop" in d.reason and "ImportError" in d.reason


def test_different_failures_or_progress_are_not_a_crash_loop():
    p = policy(max_restarts=10)
    assert p.decide(crash(progressed=False, error="a"), now=0).relaunch
    assert p.decide(crash(progressed=False, error="b"), now=1).relaunch
    assert p.decide(crash(progressed=True, error="b"), now=2).relaunch
    assert p.decide(crash(progressed=False, error="b"), now=3).relaunch


def test_no_retry_exit_codes_fail_at_once():
    d = policy(no_retry=(3,)).decide(crash(code=3), now=0)
    assert not d.relaunch and "no_retry_exit_codes" in d.reason
