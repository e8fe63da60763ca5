"""The connect circuit breaker: its state machine on a fake clock, and against real faults
(a port with nothing listening, a server stopped and started again)."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from dbkit import CircuitOpenError, ConnectError, Database
from dbkit.resilience import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refused() -> psycopg.OperationalError:
    return psycopg.OperationalError("connection failed: Connection refused")


def test_opens_after_consecutive_transient_failures_and_recovers_after_a_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 10.0, clock=clock)
    for _ in range(2):
        breaker.before_call()
        breaker.record_failure(refused())
    assert breaker.state == "closed"
    breaker.before_call()
    breaker.record_failure(refused())
    assert breaker.state == "open" and breaker.times_opened == 1
    with pytest.raises(CircuitOpenError, match="open after 3 consecutive"):
        breaker.before_call()
    clock.now = 10.0
    assert breaker.state == "half_open"
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpenError, match="probe"):
        breaker.before_call()  # only one probe at a time
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_call()


def test_failed_probe_opens_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.record_failure(refused())
    clock.now = 5.0
    breaker.before_call()
    breaker.record_failure(refused())
    assert breaker.state == "open" and breaker.times_opened == 2
    with pytest.raises(CircuitOpenError):
        breaker.before_call()


def test_the_breaker_opens_for_a_second_first_then_longer_up_to_the_recovery_timeout() -> None:
    """A restart that takes a second must not cost recovery_timeout (30 s by default)."""
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.record_failure(refused())
    opened_for = []
    for _ in range(5):
        start = clock.now
        while breaker.state == "open":
            clock.now += 0.25
        opened_for.append(clock.now - start)
        breaker.before_call()  # the probe fails: open again
        breaker.record_failure(refused())
    assert opened_for == [1.0, 2.0, 4.0, 5.0, 5.0]
    clock.now += 5.0
    breaker.before_call()
    breaker.record_success()  # closed: the next opening is short again
    breaker.record_failure(refused())
    clock.now += 1.0
    assert breaker.state == "half_open"


def test_permanent_errors_and_success_reset_nothing_wrongly() -> None:
    breaker = CircuitBreaker(2, 5.0, clock=Clock())
    auth = psycopg.OperationalError('password authentication failed for user "x"')
    for _ in range(5):
        breaker.record_failure(auth)
    assert breaker.state == "closed"
    breaker.record_failure(refused())
    breaker.record_success()
    breaker.record_failure(refused())
    assert breaker.state == "closed"  # not consecutive


def test_disabled_breaker_never_opens() -> None:
    breaker = CircuitBreaker(0, 5.0, clock=Clock())
    for _ in range(10):
        breaker.record_failure(refused())
        breaker.before_call()
    assert breaker.state == "closed"


def test_concurrent_callers_are_not_serialised() -> None:
    breaker = CircuitBreaker(5, 5.0)
    inside = threading.Barrier(4, timeout=5)

    def call() -> None:
        with breaker.guard():
            inside.wait()  # all four must be inside the guard at once

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not inside.broken


def test_database_down_opens_the_breaker_and_recovers(make_server: Any) -> None:
    server = make_server()
    db = Database.from_url(
        server.url,
        breaker_failure_threshold=3,
        breaker_recovery_timeout=0.5,
        max_retries=1,
        retry_delay=0.01,
        timeout=1,
    ).connect()
    try:
        server.kill()
        errors = []
        for _ in range(6):
            try:
                db.execute("SELECT 1")
            except (ConnectError, CircuitOpenError) as exc:
                errors.append(type(exc))
        assert errors[:3] == [ConnectError] * 3
        assert errors[3:] == [CircuitOpenError] * 3  # fail fast, no connect attempted
        health = db.health()
        assert health.ok is False and health.breaker == "open"
        server.start()
        time.sleep(0.6)  # the recovery timeout is the thing under test
        assert db.scalar("SELECT 1") == 1  # the probe succeeds and closes the breaker
        assert db.health().breaker == "closed"
        assert db.breaker.times_opened == 1
    finally:
        db.close()


def test_connect_retries_neither_open_the_breaker_nor_hide_the_cause(free_port: int) -> None:
    """connect()'s own retries are the waiting: every attempt reaches the server (none is
    refused by the breaker), the breaker stays closed, and the error names the cause
    (refused at host:port), not the breaker."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port}/postgres"
    db = Database.from_url(
        url,
        breaker_failure_threshold=2,
        breaker_recovery_timeout=30,
        max_retries=4,
        retry_delay=0.02,
    )
    with pytest.raises(ConnectError, match="retries exhausted") as info:
        db.connect()
    assert db.connect_attempts == 5
    assert db.breaker.times_opened == 0 and db.breaker.state == "closed"
    cause = str(info.value).split("(after")[0].lower()
    assert "connection refused" in cause and f"127.0.0.1:{free_port}" in cause
    assert "breaker" not in str(info.value).lower()
    assert not isinstance(info.value.__cause__, CircuitOpenError)


def test_connect_gets_through_a_breaker_opened_by_others(db_url: str) -> None:
    """The breaker was opened by failed calls; connect() (its own retries) goes through
    at once, and its success closes the breaker."""
    db = Database.from_url(db_url, breaker_failure_threshold=1, breaker_recovery_timeout=30)
    db.breaker.record_failure(refused())
    assert db.breaker.state == "open"
    db.connect()
    assert db.connect_attempts == 1
    assert db.breaker.state == "closed"
    db.close()
