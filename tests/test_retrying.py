"""The retry policy (dbkit.retrying) and the lost-COMMIT resolution loop
(dbkit.transaction.outcome.resolve_commit): pure decisions, tested without I/O."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from dbkit.errors import ConnectError
from dbkit.retrying import Attempts, Failure, RetryPolicy, next_wait
from dbkit.transaction.outcome import resolve_commit

POLICY = RetryPolicy(reruns=2, outage_tries=3, outage_delay=0.5, max_outage_delay=10.0)


def test_reruns_are_counted_and_capped() -> None:
    attempts = Attempts()
    waits = [next_wait(POLICY, attempts, Failure.RERUN, 0.0, 1.0) for _ in range(3)]
    assert waits == [0.02, 0.04, None]
    assert attempts.reruns == 2


def test_final_failures_are_never_retried() -> None:
    assert next_wait(POLICY, Attempts(), Failure.FINAL, 0.0, 0.5) is None


def test_outage_waits_do_not_spend_reruns_and_follow_the_connect_policy() -> None:
    attempts = Attempts()
    waits = [next_wait(POLICY, attempts, Failure.OUTAGE, 0.0, 1.0) for _ in range(4)]
    assert waits == [0.5, 1.0, 2.0, None]
    assert attempts.reruns == 0
    # Jitter: between half and all of the step.
    assert next_wait(POLICY, Attempts(), Failure.OUTAGE, 0.0, 0.0) == 0.25


def test_a_run_that_got_a_connection_starts_the_outage_count_again() -> None:
    attempts = Attempts()
    for _ in range(3):
        assert next_wait(POLICY, attempts, Failure.OUTAGE, 0.0, 1.0) is not None
    assert next_wait(POLICY, attempts, Failure.RERUN, 0.0, 1.0) is not None
    assert attempts.outage_waits == 0
    assert next_wait(POLICY, attempts, Failure.OUTAGE, 0.0, 1.0) == 0.5


def test_outage_delay_is_capped() -> None:
    policy = RetryPolicy(outage_tries=20, outage_delay=1.0, max_outage_delay=3.0)
    attempts = Attempts()
    waits = [next_wait(policy, attempts, Failure.OUTAGE, 0.0, 1.0) for _ in range(5)]
    assert waits == [1.0, 2.0, 3.0, 3.0, 3.0]


def test_the_deadline_caps_waits_and_ends_the_run() -> None:
    policy = RetryPolicy(reruns=100, outage_tries=100, outage_delay=5.0, deadline=2.0)
    assert next_wait(policy, Attempts(), Failure.OUTAGE, 1.5, 1.0) == pytest.approx(0.5)
    assert next_wait(policy, Attempts(), Failure.RERUN, 2.0, 1.0) is None
    assert next_wait(policy, Attempts(), Failure.OUTAGE, 2.5, 1.0) is None


class Clock:
    """Time that passes only when slept (so the loop is tested without waiting)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def resolve(answers: list[object], patience: float = 1.0) -> tuple[object, Clock, list[int]]:
    clock = Clock()
    asked: list[int] = []

    def ask(xid: int) -> str | None:
        asked.append(xid)
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        assert answer is None or isinstance(answer, str)
        return answer

    outcome = resolve_commit(
        7, ask, patience=patience, outage=POLICY, sleep=clock.sleep, clock=clock, rand=lambda: 1.0
    )
    return outcome, clock, asked


@pytest.mark.parametrize("status", ["committed", "aborted"])
def test_a_final_status_is_the_outcome(status: str) -> None:
    outcome, clock, asked = resolve([status])
    assert outcome == status and asked == [7] and clock.slept == []


def test_in_progress_is_asked_again_until_final() -> None:
    outcome, clock, asked = resolve(["in progress", "in progress", "committed"])
    assert outcome == "committed" and len(asked) == 3
    assert clock.slept == [0.02, 0.04]


def test_in_progress_past_patience_is_unknown() -> None:
    outcome, clock, _ = resolve(["in progress"] * 100, patience=0.5)
    assert outcome is None
    assert clock.now == pytest.approx(0.5)


def test_too_old_for_the_commit_log_is_unknown() -> None:
    assert resolve([None])[0] is None


def unreachable() -> ConnectError:
    error = ConnectError("cannot connect")
    error.__cause__ = psycopg.OperationalError("connection refused")
    return error


def test_an_unreachable_server_is_waited_for_with_the_connect_policy() -> None:
    outcome, clock, asked = resolve([unreachable(), unreachable(), "aborted"])
    assert outcome == "aborted" and len(asked) == 3
    assert clock.slept == [0.5, 1.0]


def test_a_server_that_stays_away_leaves_the_outcome_unknown() -> None:
    outcome, _, asked = resolve([unreachable()] * 10)
    assert outcome is None
    assert len(asked) == POLICY.outage_tries + 1


def test_a_permanent_error_leaves_the_outcome_unknown_at_once() -> None:
    make: Callable[[], BaseException] = lambda: psycopg.errors.InsufficientPrivilege("no")  # noqa: E731
    outcome, clock, asked = resolve([make()])
    assert outcome is None and asked == [7] and clock.slept == []
