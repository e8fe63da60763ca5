"""The pool against a real server: Go's caps, idle/lifetime eviction, DBStats counters,
liveness after the server drops connections."""

from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

import dbkit
from dbkit import Database, PoolTimeoutError


def backends(admin_url: str, application_name: str) -> int:
    """Server-side count of connections opened by one pool (told apart by application_name)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def terminate(admin_url: str, application_name: str) -> int:
    """pg_terminate_backend every connection of the pool, waiting until each has exited."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return len(rows)


def psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_open_and_idle_caps_hold_under_concurrency(db_url: str, fast_paths: bool) -> None:
    app = "caps-test"
    db = Database.from_url(
        fast_paths=fast_paths, url=db_url, max_open_conns=3, max_idle_conns=1, application_name=app
    )
    db.connect()
    seen_open: list[int] = []
    seen_server: list[int] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(3):
            with db.transaction() as conn:
                conn.exec_driver_sql("SELECT pg_sleep(0.05)")
                seen_open.append(db.stats().open_connections)
                seen_server.append(backends(psycopg_url(db_url), app))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        stats = db.stats()
        assert max(seen_open) <= 3
        assert max(seen_server) <= 3
        assert max(seen_open) == 3  # the cap was reached, so it was really tested
        assert stats.max_open_connections == 3
        assert stats.in_use == 0
        assert stats.idle == 1 == stats.open_connections  # max_idle_conns kept, rest closed
        assert stats.max_idle_closed >= 2
        assert stats.wait_count > 0 and stats.wait_duration > 0
        assert backends(psycopg_url(db_url), app) == 1
    finally:
        db.close()
    assert db.stats().open_connections == 0


def test_exhausted_pool_raises_pool_timeout_with_limits(db_url: str, fast_paths: bool) -> None:
    db = Database.from_url(
        fast_paths=fast_paths, url=db_url, max_open_conns=1, max_idle_conns=1, timeout=0.3
    ).connect()
    errors: list[BaseException] = []
    try:
        with db.transaction():

            def other_thread() -> None:
                try:
                    db.execute("SELECT 1")
                except BaseException as exc:
                    errors.append(exc)

            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        assert len(errors) == 1
        error = errors[0]
        assert isinstance(error, PoolTimeoutError)
        assert "max_open_conns=1" in str(error) and "1 in use" in str(error)
        stats = db.stats()
        assert stats.wait_count == 1 and stats.wait_timeouts == 1
        assert db.scalar("SELECT 42") == 42  # the pool is fine afterwards
    finally:
        db.close()


def test_interrupted_wait_does_not_lose_the_connection(db_url: str, fast_paths: bool) -> None:
    """Ctrl-C while waiting for a connection (a signal handler raising in the main thread):
    the connection released afterwards must go back to the pool, not to the gone waiter."""

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    # A lost connection would make the last checkout below time out after 3 s.
    db = Database.from_url(
        fast_paths=fast_paths, url=db_url, max_open_conns=1, max_idle_conns=1, timeout=3
    ).connect()
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with db.transaction():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        assert holding.wait(10)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            db.scalar("SELECT 1")  # blocks: the only connection is held
        release.set()
        holder.join()
        assert db.scalar("SELECT 2") == 2
        stats = db.stats()
        assert stats.in_use == 0 and stats.idle == 1 and stats.wait_timeouts == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        db.close()


def test_idle_connections_are_evicted_and_counted(db_url: str, fast_paths: bool) -> None:
    app = "idle-test"
    db = Database.from_url(
        fast_paths=fast_paths,
        url=db_url,
        max_open_conns=4,
        max_idle_conns=4,
        conn_max_idle_time=0.2,
        application_name=app,
    ).connect()
    try:
        # Two connections at once, both returned to the pool.
        with db.transaction():
            t = threading.Thread(target=lambda: db.scalar("SELECT 1"))
            t.start()
            t.join()
        assert db.stats().open_connections == 2
        time.sleep(0.3)  # let them age past conn_max_idle_time
        closed = db.evict_expired()
        stats = db.stats()
        assert closed == 2
        assert stats.max_idle_time_closed == 2
        assert stats.open_connections == 0
        assert backends(psycopg_url(db_url), app) == 0
        # The pool reconnects on demand.
        assert db.scalar("SELECT 7") == 7
        # Checkout-time eviction counts too (without the sweep).
        time.sleep(0.3)
        assert db.scalar("SELECT 8") == 8
        assert db.stats().max_idle_time_closed == 3
    finally:
        db.close()


def test_lifetime_recycles_connections_and_counts(db_url: str, fast_paths: bool) -> None:
    db = Database.from_url(
        fast_paths=fast_paths, url=db_url, conn_max_lifetime=0.3, conn_max_idle_time=0
    ).connect()
    try:
        first = db.scalar("SELECT pg_backend_pid()")
        assert db.scalar("SELECT pg_backend_pid()") == first  # reused while young
        time.sleep(0.35)
        second = db.scalar("SELECT pg_backend_pid()")
        stats = db.stats()
        assert second != first
        assert stats.max_lifetime_closed == 1
        assert stats.connects == 2
    finally:
        db.close()


def test_max_idle_conns_zero_keeps_no_idle_connection(db_url: str, fast_paths: bool) -> None:
    db = Database.from_url(
        fast_paths=fast_paths, url=db_url, max_open_conns=2, max_idle_conns=0
    ).connect()
    try:
        db.scalar("SELECT 1")
        db.scalar("SELECT 1")
        stats = db.stats()
        assert stats.open_connections == 0
        assert stats.max_idle_closed >= 2
    finally:
        db.close()


def test_terminated_idle_connections_are_replaced_transparently(
    db_url: str, fast_paths: bool
) -> None:
    app = "terminate-idle"
    db = Database.from_url(
        fast_paths=fast_paths, url=db_url, max_open_conns=3, max_idle_conns=3, application_name=app
    )
    db.connect()
    try:
        barrier = threading.Barrier(3)

        def hold() -> None:
            with db.transaction() as conn:
                conn.exec_driver_sql("SELECT 1")
                barrier.wait()

        threads = [threading.Thread(target=hold) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert db.stats().idle == 3
        assert terminate(psycopg_url(db_url), app) == 3
        # Right away (well within ping_after_idle): no error may reach the caller.
        for _ in range(5):
            assert db.scalar("SELECT 1") == 1
        stats = db.stats()
        assert stats.invalidated >= 1
        assert stats.in_use == 0
    finally:
        db.close()


def test_server_restart_is_invisible_to_the_next_checkout(make_server, fast_paths: bool) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    db = Database.from_url(
        fast_paths=fast_paths, url=server.url, max_open_conns=3, max_idle_conns=3
    ).connect()
    try:
        pids = set()
        barrier = threading.Barrier(3)

        def hold() -> None:
            with db.transaction() as conn:
                pids.add(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
                barrier.wait()

        threads = [threading.Thread(target=hold) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(pids) == 3
        server.restart()
        for _ in range(3):
            assert db.scalar("SELECT 1") == 1
        with db.transaction() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() not in pids
    finally:
        db.close()


def test_health_reports_a_down_server_and_recovers(make_server, fast_paths: bool) -> None:  # type: ignore[no-untyped-def]
    server = make_server()
    db = Database.from_url(fast_paths=fast_paths, url=server.url, timeout=1).connect()
    try:
        assert db.health().ok
        server.stop()
        health = db.health()
        assert health.ok is False
        assert health.error is not None and "refused" in health.error.lower()
        assert health.pool.in_use == 0
        server.start()
        assert db.health().ok
    finally:
        db.close()


def test_connection_killed_mid_transaction(db_url: str, fast_paths: bool) -> None:
    app = "kill-mid-tx"
    db = Database.from_url(fast_paths=fast_paths, url=db_url, application_name=app).connect()
    try:
        db.execute("CREATE TABLE items (id int primary key)")
        with pytest.raises(dbkit.RetryableError) as info, db.transaction() as conn:
            conn.exec_driver_sql("INSERT INTO items VALUES (1)")
            terminate(psycopg_url(db_url), app)
            conn.exec_driver_sql("INSERT INTO items VALUES (2)")
        # A clear error (the work is safe to run again, the driver's error attached), the
        # pool knows the connection is gone, and nothing was written.
        assert "connection lost before COMMIT" in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, sa.exc.OperationalError) and cause.connection_invalidated
        assert dbkit.is_transient(info.value)
        assert db.stats().in_use == 0
        assert db.scalar("SELECT count(*) FROM items") == 0
    finally:
        db.close()
