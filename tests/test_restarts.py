"""The restart policy on its own: budget, window, backoff, crash loops, no-retry codes."""

from supervisord_ft.restarts import Decision, Failure, RestartPolicy


def crash(at_startup: bool = False, code: int = 1, error: str = "boom") -> Failure:
    return Failure(rank=0, returncode=code, last_error=error, at_startup=at_startup)


def decide(p: RestartPolicy, failure: Failure, now: float) -> Decision:
    """As the loop does: a relaunch that is decided happens, and spends budget."""
    d = p.decide(failure, now)
    if d.relaunch:
        p.spend(now)
    return d


def policy(max_restarts: int = 3, window: float = 0, backoff: float = 1, cap: float = 30,
           no_retry: tuple[int, ...] = ()) -> RestartPolicy:
    return RestartPolicy(max_restarts, window, backoff, cap, no_retry)


def test_budget_counts_relaunches_and_backoff_doubles_from_the_second():
    p = policy(max_restarts=4, backoff=1, cap=3)
    decisions = [decide(p, crash(), now=t) for t in range(5)]
    assert [d.relaunch for d in decisions] == [True, True, True, True, False]
    assert [d.delay for d in decisions[:4]] == [0, 1, 2, 3]
    assert p.total == 4 and "max_restarts (4) in this run" in decisions[-1].reason


def test_window_forgets_old_restarts():
    p = policy(max_restarts=1, window=10)
    assert decide(p, crash(), now=0).relaunch
    assert not decide(p, crash(), now=5).relaunch  # second within 10 s
    assert decide(p, crash(), now=20).relaunch  # the first fell out of the window
    assert p.total == 2


def test_same_start_up_failure_twice_is_a_crash_loop():
    p = policy(max_restarts=10)
    assert decide(p, crash(at_startup=True, error="ImportError: x"), now=0).relaunch
    d = decide(p, crash(at_startup=True, error="ImportError: x"), now=1)
    assert not d.relaunch and d.crash_loop and "crash loop" in d.reason and "ImportError" in d.reason


def test_different_failures_or_failures_after_start_up_are_not_a_crash_loop():
    p = policy(max_restarts=10)
    assert decide(p, crash(at_startup=True, error="a"), now=0).relaunch
    assert decide(p, crash(at_startup=True, error="b"), now=1).relaunch
    assert decide(p, crash(at_startup=False, error="b"), now=2).relaunch
    assert decide(p, crash(at_startup=True, error="b"), now=3).relaunch
    # the same outside SIGKILL, each after the start-up window: one restart each, never a loop
    p = policy(max_restarts=10)
    assert all(decide(p, crash(code=-9, error=""), now=t).relaunch for t in range(5))
    assert p.total == 5


def test_no_retry_exit_codes_fail_at_once():
    d = decide(policy(no_retry=(3,)), crash(code=3), now=0)
    assert not d.relaunch and "no_retry_exit_codes" in d.reason


def test_backoff_stays_at_the_cap_after_thousands_of_restarts_in_a_window():
    p = policy(max_restarts=5000, backoff=1.0, cap=30.0)  # floats, as from the config
    delays = [decide(p, crash(), now=0).delay for _ in range(2000)]  # 2 ** 1100 is no float
    assert delays[:3] == [0, 1, 2] and delays[-1] == 30
