"""Failover with libpq's multi-host settings: the primary is stopped, its streaming replica
promoted, and a transaction retried with ``retries=`` lands on the new primary.  Nothing
reported committed is lost, and connections to the old primary are not used again."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

from dbkit import Database, RetryableError
from dbkit.local import LocalPostgres
from dbkit.settings import PostgresConfig


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_multi_host_settings_and_urls() -> None:
    config = PostgresConfig(host="db-a,db-b", port="5432,5433", target_session_attrs="read-write")
    assert config.addresses() == [("db-a", 5432), ("db-b", 5433)]
    assert config.safe_dsn() == "postgresql://postgres@db-a:5432,db-b:5433/postgres"
    again = PostgresConfig.from_url(config.url())
    assert (again.host, again.port, again.target_session_attrs) == (
        "db-a,db-b",
        "5432,5433",
        "read-write",
    )
    with pytest.raises(ValueError, match="2 ports for 3 hosts"):
        PostgresConfig(host="a,b,c", port="1,2")
    with pytest.raises(ValueError, match="target_session_attrs"):
        PostgresConfig(target_session_attrs="leader")


def test_a_retried_write_lands_on_the_promoted_replica() -> None:
    with LocalPostgres() as old:
        new = old.start_replica()
        try:
            failover(old, new)
        finally:
            new.stop()


def failover(old: LocalPostgres, new: LocalPostgres) -> None:
    with psycopg.connect(plain(old.url), autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, port int NOT NULL)")
        conn.execute("ALTER SYSTEM SET synchronous_commit = on")  # acknowledged = durable
        conn.execute("SELECT pg_reload_conf()")
    db = Database.from_url(
        f"postgresql+psycopg://postgres@/postgres?host=127.0.0.1:{old.port}"
        f"&host=127.0.0.1:{new.port}&target_session_attrs=read-write",
        max_open_conns=4,
        max_retries=20,
        retry_delay=0.1,
    ).connect()
    committed: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(conn: sa.Connection, n: int) -> None:
        conn.execute(sa.text("INSERT INTO ledger VALUES (:n, inet_server_port())"), {"n": n})

    def writer() -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                db.run_in_transaction(lambda conn, n=n: write(conn, n), retries=10)
                committed.append(n)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(committed) < 20 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
        old.stop()  # fast shutdown: the standby receives everything first
        new.promote()
        before = len(committed)
        deadline = time.monotonic() + 60
        while len(committed) < before + 20 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    with psycopg.connect(plain(new.url), autocommit=True) as conn:
        rows = dict(conn.execute("SELECT id, port FROM ledger").fetchall())
    assert set(committed) <= set(rows), "a write reported committed is missing"
    assert new.port in set(rows.values()), "no write landed on the new primary"
    assert rows[committed[-1]] == new.port
    # New transactions go to the new primary, and its connections are what the pool holds.
    with db.transaction() as conn:
        assert conn.scalar(sa.text("SELECT inet_server_port()")) == new.port
        assert not conn.scalar(sa.text("SELECT pg_is_in_recovery()"))
    db.close()


def test_a_write_on_a_server_that_became_read_only_is_retryable() -> None:
    """A pooled connection to a server now in recovery (here: a standby reached directly)
    refuses the write with 25006: a RetryableError, and that connection is discarded."""
    with LocalPostgres() as primary:
        standby = primary.start_replica()
        try:
            db = Database.from_url(standby.url).connect()
            with pytest.raises(RetryableError), db.transaction() as conn:
                conn.execute(sa.text("CREATE TABLE nope (id int)"))
            assert db.stats().open_connections == 0  # discarded, not pooled
            db.close()
        finally:
            standby.stop()
