"""Statement and transaction metrics, and the slow-query log (statement yes, values no)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from loguru import logger
from sqlalchemy.dialects import postgresql

from dbkit import Database, PostgresConfig
from dbkit.metrics import StatementObserver
from dbkit.stats import QueryCounters

SERIALIZATION_FAILURE = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"


@pytest.fixture
def logs() -> Iterator[list[str]]:
    records: list[str] = []
    sink = logger.add(lambda m: records.append(str(m)), level="DEBUG", format="{message}")
    logger.enable("dbkit")
    yield records
    logger.remove(sink)
    logger.disable("dbkit")


def test_statements_errors_and_transactions_are_counted(db: Database) -> None:
    before = db.query_stats()
    db.execute("CREATE TABLE t (id int primary key)")
    db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sa.exc.IntegrityError):
        db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sa.exc.ProgrammingError):
        db.execute("SELEKT 1")
    with db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (2)"))
    with pytest.raises(ZeroDivisionError), db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES (3)"))
        raise ZeroDivisionError
    stats = db.query_stats()
    assert stats.statements - before.statements == 6
    assert stats.errors - before.errors == 2
    assert stats.errors_by_class["23"] == 1 and stats.errors_by_class["42"] == 1
    assert stats.latency_buckets["+Inf"] == stats.statements
    assert stats.transactions_committed - before.transactions_committed == 1
    assert stats.transactions_rolled_back - before.transactions_rolled_back == 1


def test_retries_are_counted(db: Database) -> None:
    attempts = []

    def work(conn: sa.Connection) -> int:
        attempts.append(1)
        if len(attempts) < 3:
            conn.exec_driver_sql(SERIALIZATION_FAILURE)
        return len(attempts)

    assert db.run_in_transaction(work, retries=5) == 3
    stats = db.query_stats()
    assert stats.transactions_retried == 2
    assert stats.errors_by_class["40"] == 2
    assert stats.transactions_committed == 1


def test_slow_query_log_shows_the_statement_not_the_values(db_url: str, logs: list[str]) -> None:
    with Database.from_url(db_url).connect() as plain:
        plain.scalar("SELECT pg_sleep(0.05)")
    assert not any("slow statement" in line for line in logs)
    db = Database(PostgresConfig.from_url(db_url), slow_query_threshold=0.02).connect()
    try:
        db.execute("SELECT pg_sleep(0.05), :secret AS s", {"secret": "hunter2-value"})
        db.execute("SELECT 1")
    finally:
        db.close()
    slow = [line for line in logs if "slow statement" in line]
    assert len(slow) == 1
    assert "pg_sleep(0.05)" in slow[0] and "hunter2-value" not in slow[0]
    assert db.query_stats().slow_statements == 1


def test_leak_detection_reports_where_a_held_connection_was_taken(
    db_url: str, logs: list[str]
) -> None:
    config = PostgresConfig.from_url(db_url, leak_detection_threshold=0.1)
    with Database(config) as db:

        def hold_connection_too_long() -> None:
            with db.transaction() as conn:
                conn.exec_driver_sql("SELECT 1")
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any("checked out" in m for m in logs):
                    time.sleep(0.02)

        hold_connection_too_long()
        with db.transaction():
            pass  # a short checkout is never reported
    reports = [m for m in logs if "checked out for" in m]
    assert len(reports) == 1
    assert "hold_connection_too_long" in reports[0] and "test_metrics.py" in reports[0]


def test_observer_run_times_and_observes_one_call() -> None:
    observer = StatementObserver(QueryCounters())
    seen: list[tuple[BaseException | None, str]] = []
    observer.listeners.append(lambda seconds, error, text: seen.append((error, text())))
    dialect = postgresql.dialect()

    def call(a: int, *, b: int) -> int:
        if a < 0:
            raise ValueError("negative")
        if a == 0:
            raise KeyboardInterrupt
        return a + b

    assert observer.run(call, "SELECT 1", (), dialect, 1, b=2) == 3
    with pytest.raises(ValueError, match="negative"):
        observer.run(call, "SELECT 2", (), dialect, -1, b=0)
    with pytest.raises(KeyboardInterrupt):  # not a statement error: not observed
        observer.run(call, "SELECT 3", (), dialect, 0, b=0)
    stats = observer.counters.snapshot()
    assert (stats.statements, stats.errors, stats.errors_by_class) == (2, 1, {"ValueError": 1})
    assert [(type(error), text) for error, text in seen] == [
        (type(None), "SELECT 1"),
        (ValueError, "SELECT 2"),
    ]
