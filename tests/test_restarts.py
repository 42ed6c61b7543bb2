"""The restart policy on its own: budget, window, backoff, crash loops, deterministic failures,
no restart without progress, no-retry codes. Every rule reads the explained cause."""

from supervisord_ft.causes import Cause
from supervisord_ft.restarts import Decision, Failure, RestartPolicy


def crash(at_startup: bool = False, code: int = 1, error: str = "boom",
          progressed: bool | None = None) -> Failure:
    """A failure that exited ``code`` saying ``error`` (no traceback)."""
    cause = Cause(0, "signal" if code < 0 else "exit_code", error, "exit_status", returncode=code)
    return Failure(0, cause, at_startup, progressed)


def raised(exception: str = "ValueError", where: str = "job.py:88 in load_batch",
           message: str = "bad batch", progressed: bool | None = False, rank: int = 1,
           at_startup: bool = False) -> Failure:
    cause = Cause(rank, "exception", message, "stderr", exception, where, 1)
    return Failure(rank, cause, at_startup, progressed)


def decide(p: RestartPolicy, failure: Failure, now: float) -> Decision:
    """As the loop does: a relaunch that is decided happens, and spends budget."""
    d = p.decide(failure, now)
    if d.relaunch:
        p.spend(now)
    return d


def policy(max_restarts: int = 3, window: float = 0, backoff: float = 1, cap: float = 30,
           no_retry: tuple[int, ...] = (), stalled: int = 3) -> RestartPolicy:
    return RestartPolicy(max_restarts, window, backoff, cap, no_retry, stalled)


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


def test_no_retry_exit_codes_fail_at_once_and_say_do_not_requeue():
    d = decide(policy(no_retry=(3,)), crash(code=3), now=0)
    assert not d.relaunch and not d.requeue and "no_retry_exit_codes" in d.reason


def test_the_same_exception_at_the_same_place_without_progress_is_not_retried_a_third_time():
    p = policy(max_restarts=10, window=5)
    assert decide(p, raised(progressed=True, message="batch 150"), now=0).relaunch
    d = decide(p, raised(progressed=False, message="batch 151"), now=100)  # messages may differ
    assert not d.relaunch and not d.requeue
    assert "deterministic" in d.reason and "ValueError" in d.reason and "load_batch" in d.reason


def test_the_same_exception_after_progress_or_elsewhere_spends_the_budget():
    p = policy(max_restarts=10)
    assert decide(p, raised(progressed=True), now=0).relaunch
    assert decide(p, raised(progressed=True), now=1).relaunch  # further each time: not stuck
    assert decide(p, raised(progressed=False, where="job.py:90 in step"), now=2).relaunch
    assert decide(p, raised(progressed=None, where="job.py:90 in step"), now=3).relaunch  # cannot tell
    assert p.total == 4


def test_outside_causes_spend_the_budget_even_without_progress():
    p = policy(max_restarts=100)
    for cause, rc in (("signal", -9), ("oom", -9), ("hang", None), ("peer_lost", 1)):
        c = Cause(0, cause, "x", "exit_status", returncode=rc)
        assert all(decide(p, Failure(0, c, False, False), now=t).relaunch for t in range(4)), cause
    assert p.stalled == 0


def test_attempts_without_progress_end_the_run_whatever_the_window_gives_back():
    p = policy(max_restarts=2, window=1, stalled=3)
    errors = ("KeyError", "IndexError", "OSError")
    decisions = [decide(p, raised(exception=e, progressed=False), now=10 * i) for i, e in enumerate(errors)]
    assert [d.relaunch for d in decisions] == [True, True, False]
    assert "no progress: 3 attempts" in decisions[-1].reason and not decisions[-1].requeue


def test_progress_resets_the_count_and_zero_turns_both_rules_off():
    p = policy(max_restarts=100, stalled=2)
    for i in range(6):  # stuck, then further, alternately: never two in a row
        assert decide(p, raised(exception=f"E{i}", progressed=i % 2 == 0), now=i).relaunch
    p = policy(max_restarts=100, stalled=0)
    assert all(decide(p, raised(progressed=False), now=t).relaunch for t in range(5))


def test_a_warning_line_never_makes_two_failures_the_same():
    """Two different exceptions whose rank's last stderr line is the same warning."""
    p = policy(max_restarts=10)
    assert decide(p, raised(exception="KeyError", at_startup=True), now=0).relaunch
    assert decide(p, raised(exception="IndexError", at_startup=True), now=1).relaunch


def test_backoff_stays_at_the_cap_after_thousands_of_restarts_in_a_window():
    p = policy(max_restarts=5000, backoff=1.0, cap=30.0)  # floats, as from the config
    delays = [decide(p, crash(), now=0).delay for _ in range(2000)]  # 2 ** 1100 is no float
    assert delays[:3] == [0, 1, 2] and delays[-1] == 30
