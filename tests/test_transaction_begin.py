"""The BEGIN of a ``db.transaction()`` block goes out when the block starts and its answer
is read with the block's first statement (``PgConnection.send_begin``): what the
server sees, and what happens when the connection dies in between."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from dbkit import Database, RetryableError
from dbkit.fastpath.psycopg import PgConnection


def driver_of(conn: object) -> PgConnection:
    driver = conn.connection.driver_connection  # type: ignore[attr-defined]
    assert isinstance(driver, PgConnection)
    return driver


@pytest.mark.fast_path
def test_begin_is_in_flight_until_the_first_statement(db: Database) -> None:
    with db.transaction() as conn:
        pgconn = driver_of(conn).pgconn
        # libpq: a command is in flight, its answer not read yet
        assert pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE
        assert conn.exec_driver_sql("SELECT now() = statement_timestamp()").scalar() is False
        assert pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS


@pytest.mark.fast_path
def test_an_empty_block_still_commits_cleanly(db: Database) -> None:
    with db.transaction() as conn:
        driver = driver_of(conn)
    assert driver.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert db.scalar("SELECT 1") == 1


def test_plain_begin_keeps_the_servers_read_only_default(db_url: str, fast_paths: bool) -> None:
    """No READ WRITE is sent unless asked: a session (or role, or standby) that defaults to
    read-only stays read-only in a plain block; ``readonly=False`` asks."""
    db = Database.from_url(fast_paths=fast_paths, url=db_url, max_open_conns=1).connect()
    try:
        db.execute("SET default_transaction_read_only = on")  # on the one pooled connection
        with db.transaction() as conn:
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        with db.transaction(readonly=False) as conn:
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "off"
        with db.transaction(isolation="serializable", readonly=True) as conn:
            shown = conn.exec_driver_sql(
                "SELECT current_setting('transaction_isolation'), "
                "current_setting('transaction_read_only')"
            ).one()
            assert tuple(shown) == ("serializable", "on")
    finally:
        db.close()


def test_connection_killed_before_the_first_statement(db_url: str, fast_paths: bool) -> None:
    """The BEGIN's answer never comes: the first statement raises the disconnect (as the
    implicit BEGIN would have), the block rolls back and says it can be run again, the pool
    replaces the connection."""
    db = Database.from_url(fast_paths=fast_paths, url=db_url, max_open_conns=1).connect()
    try:
        pid = db.scalar("SELECT pg_backend_pid()")
        admin = db_url.replace("postgresql+psycopg://", "postgresql://")
        with pytest.raises(RetryableError) as lost, db.transaction() as conn:
            with psycopg.connect(admin, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            conn.exec_driver_sql("SELECT 1")
        cause = lost.value.__cause__
        assert isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated
        assert db.scalar("SELECT pg_backend_pid()") != pid
        assert db.stats().in_use == 0
    finally:
        db.close()
