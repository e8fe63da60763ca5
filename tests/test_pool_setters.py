"""Go's setters at run time (``db.set_max_open_conns`` …) against a real server, with the
fast paths on and off: the caps hold under concurrency and match ``pg_stat_activity``, a
lowered open cap closes connections as they come back, a lowered idle cap closes idle ones
now, new lifetimes apply to connections already open, bad input is refused."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from fractions import Fraction
from typing import Any

import psycopg
import pytest

# Finds a thread waiting in the pool (HandoffQueue.get / CheckoutQueue.get): the wait
# statistics are only counted once a wait ends.
from test_faults_more import blocked_in_checkout

from dbkit import ConnectError, Database

WAIT = 30.0  # bound on any wait for a condition (never an assertion about time)


def unique_app(prefix: str) -> str:
    """An application_name no other test's connections carry."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def backends(db_url: str, app: str) -> int:
    """The server's count of connections with this application_name."""
    with psycopg.connect(psycopg_url(db_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def settled(db: Database, db_url: str, app: str) -> int:
    """With nothing checked out: wait until the server agrees with ``db.stats()`` (a closed
    backend takes a moment to leave pg_stat_activity), and return the count."""
    stats = db.stats()
    assert stats.in_use == 0
    assert stats.open_connections == stats.idle
    wait_for(
        lambda: backends(db_url, app) == db.stats().open_connections,
        f"pg_stat_activity to match db.stats() ({db.stats()})",
    )
    return db.stats().open_connections


class Threads:
    """Worker threads whose exceptions fail the test."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def start(self, target: Callable[[], Any], name: str = "worker") -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as error:
                self.errors.append(error)

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join(self) -> None:
        for thread in self.threads:
            thread.join(WAIT)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"threads did not finish: {alive}"
        if self.errors:
            raise AssertionError(f"worker threads failed: {self.errors!r}") from self.errors[0]


def hold(
    db: Database, threads: Threads, count: int
) -> tuple[list[threading.Event], Callable[[int], None]]:
    """``count`` threads each inside a transaction (all at once, so ``count`` connections
    are checked out); ``release(i)`` lets thread ``i`` commit and waits until it is done."""
    inside = threading.Barrier(count + 1, timeout=WAIT)
    go = [threading.Event() for _ in range(count)]
    finished = [threading.Event() for _ in range(count)]

    def holder(i: int) -> None:
        with db.transaction() as conn:
            conn.exec_driver_sql("SELECT 1")
            inside.wait()
            assert go[i].wait(WAIT)
        finished[i].set()

    for i in range(count):
        threads.start(lambda i=i: holder(i), name=f"holder-{i}")
    inside.wait()

    def release(i: int) -> None:
        go[i].set()
        wait_for(finished[i].is_set, f"holder {i} to commit")

    return go, release


@contextmanager
def database(db_url: str, fast_paths: bool, app: str, **settings: Any) -> Iterator[Database]:
    db = Database.from_url(
        db_url, application_name=app, fast_paths=fast_paths, **settings
    ).connect()
    try:
        yield db
    finally:
        db.close()


def open_idle(db: Database, threads: Threads, count: int) -> None:
    """Leave ``count`` connections idle: ``count`` threads in transactions at once."""
    _, release = hold(db, threads, count)
    for i in range(count):
        release(i)


# -- under 8 threads ------------------------------------------------------------------------


class Workers:
    """8 threads running transactions (and statements outside one) until stopped; they can
    be parked between two transactions, so that the pool can be looked at at rest."""

    def __init__(self, db: Database, threads: Threads, count: int = 8) -> None:
        self.db = db
        self.count = count
        self.done = 0
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.running.set()
        self.stopped = False
        self.parked = 0
        for i in range(count):
            threads.start(lambda i=i: self.work(i), name=f"worker-{i}")

    def work(self, i: int) -> None:
        db = self.db
        n = 0
        while not self.stopped:
            if not self.running.is_set():
                with self.lock:
                    self.parked += 1
                self.running.wait()
                with self.lock:
                    self.parked -= 1
                continue
            n += 1
            if n % 3:
                with db.transaction() as conn:
                    conn.exec_driver_sql(f"INSERT INTO hits VALUES ({i})")
                    conn.exec_driver_sql("SELECT pg_sleep(0.002)")
            else:
                assert db.scalar("SELECT count(*) FROM hits WHERE n = :i", {"i": i}) >= 0
            with self.lock:
                self.done += 1

    def progress(self) -> int:
        with self.lock:
            return self.done

    def park(self) -> None:
        self.running.clear()
        wait_for(lambda: self.parked == self.count, "every worker to park")

    def resume(self) -> None:
        self.running.set()

    def stop(self) -> None:
        self.stopped = True
        self.running.set()


def at_rest(workers: Workers, db: Database, db_url: str, app: str, cap: int, max_idle: int) -> None:
    """Park the workers; the server then agrees with ``db.stats()``, within the caps."""
    workers.park()
    try:
        open_now = settled(db, db_url, app)
        assert open_now <= max_idle, db.stats()
        if cap:
            assert open_now <= cap
    finally:
        workers.resume()


def test_setters_under_eight_threads_match_stats_and_the_server(
    db_url: str, fast_paths: bool
) -> None:
    app = unique_app("setters-8")
    threads = Threads()
    with database(db_url, fast_paths, app, max_open_conns=8, max_idle_conns=4, timeout=60) as db:
        db.execute("CREATE TABLE hits (n int)")
        workers = Workers(db, threads)
        # (setter, value, the open cap after it (0 = none), the idle cap after it)
        phases = [
            ("set_max_open_conns", 3, 3, 3),  # lowered below max_idle: lowers it too
            ("set_max_idle_conns", 1, 3, 1),
            ("set_max_open_conns", 6, 6, 1),
            ("set_max_idle_conns", 6, 6, 6),
            ("set_max_open_conns", 1, 1, 1),
            ("set_max_idle_conns", 0, 1, 0),
            ("set_max_open_conns", 0, 0, 0),  # unlimited
            ("set_max_idle_conns", 8, 0, 8),
            ("set_max_open_conns", 2, 2, 2),
        ]
        try:
            for setter, value, cap, max_idle in phases:
                waits_before = db.stats().wait_count
                getattr(db, setter)(value)  # while the 8 threads run
                assert db.stats().max_open_connections == cap
                if cap:
                    # Connections beyond a lowered cap close as they come back.
                    wait_for(lambda: db.stats().open_connections <= cap, f"open <= {cap}")  # noqa: B023
                at_rest(workers, db, db_url, app, cap, max_idle)
                # A backend leaves pg_stat_activity a moment after its client closed it, so
                # the server is held to the cap while nothing is closed and reopened: when
                # every returned connection may stay idle (max_idle = cap).
                steady = bool(cap) and max_idle >= cap
                target = workers.progress() + 60
                seen_open, seen_server = [], []
                while workers.progress() < target:
                    stats = db.stats()
                    assert stats.open_connections == stats.in_use + stats.idle
                    seen_open.append(stats.open_connections)
                    if steady:
                        seen_server.append(backends(db_url, app))
                if cap:
                    assert max(seen_open) <= cap, (setter, value, seen_open)
                    assert max(seen_server, default=0) <= cap, (setter, value, seen_server)
                if cap == 1:
                    # 8 threads, 1 connection: waits end, first come first served.
                    assert db.stats().wait_count > waits_before, (setter, value, db.stats())
                at_rest(workers, db, db_url, app, cap, max_idle)
        finally:
            workers.stop()
            threads.join()
        stats = db.stats()
        assert stats.in_use == 0 and stats.max_open_connections == 2
        assert stats.max_idle_closed > 0
        assert settled(db, db_url, app) <= 2
        assert db.scalar("SELECT count(*) FROM hits") > 0
    wait_for(lambda: backends(db_url, app) == 0, "the closed Database's backends to go")
    assert db.stats().open_connections == 0


# -- the open cap -----------------------------------------------------------------------------


def test_lowering_max_open_closes_connections_as_they_come_back(
    db_url: str, fast_paths: bool
) -> None:
    app = unique_app("setters-open")
    threads = Threads()
    with database(db_url, fast_paths, app, max_open_conns=4, max_idle_conns=4, timeout=60) as db:
        _, release = hold(db, threads, 4)
        db.set_max_open_conns(1)
        # Nothing in use is interrupted.
        stats = db.stats()
        assert stats.max_open_connections == 1
        assert stats.in_use == 4 and stats.open_connections == 4
        assert backends(db_url, app) == 4

        # A new checkout waits: the cap is reached and nothing is idle.
        waiter_done = threading.Event()

        def waiter() -> None:
            assert db.scalar("SELECT 5") == 5
            waiter_done.set()

        waiting = threads.start(waiter, name="waiter")
        wait_for(lambda: blocked_in_checkout(waiting), "the waiter to wait")

        for i, left in zip(range(3), (3, 2, 1), strict=True):
            release(i)  # closed as it comes back: still more than 1 open
            stats = db.stats()
            assert stats.open_connections == left and stats.in_use == left
            assert stats.idle == 0
            assert not waiter_done.is_set()  # one is still in use: the cap is reached
        wait_for(lambda: backends(db_url, app) == 1, "the closed backends to leave")

        release(3)  # within the cap now: kept, and the waiter gets it
        wait_for(waiter_done.is_set, "the waiter to get the connection")
        threads.join()
        stats = db.stats()
        assert stats.open_connections == 1 and stats.idle == 1
        assert stats.max_idle_closed == 0  # beyond max_open is not Go's MaxIdleClosed
        assert settled(db, db_url, app) == 1


def test_raising_max_open_lets_waiters_proceed_at_once(db_url: str, fast_paths: bool) -> None:
    app = unique_app("setters-raise")
    threads = Threads()
    with database(db_url, fast_paths, app, max_open_conns=1, max_idle_conns=1, timeout=60) as db:
        go, release = hold(db, threads, 1)
        got = [threading.Event() for _ in range(2)]
        waiters = [
            threads.start(lambda i=i: (db.scalar("SELECT 1"), got[i].set()), name=f"waiter-{i}")
            for i in range(2)
        ]
        wait_for(lambda: all(map(blocked_in_checkout, waiters)), "both waiters to wait")
        db.set_max_open_conns(3)
        for event in got:
            wait_for(event.is_set, "a waiter to get a connection")
        assert not go[0].is_set()  # the holder still holds: the raise let them through
        stats = db.stats()
        assert stats.max_open_connections == 3 and stats.wait_count == 2
        release(0)
        threads.join()
        assert settled(db, db_url, app) <= 1  # max_idle_conns 1


def test_max_open_set_before_connect_and_kept_across_close(db_url: str, fast_paths: bool) -> None:
    app = unique_app("setters-keep")
    db = Database.from_url(
        db_url, max_open_conns=8, max_idle_conns=8, application_name=app, fast_paths=fast_paths
    )
    try:
        db.set_max_open_conns(2)  # not connected yet
        db.set_conn_max_idle_time(600)
        db.connect()
        for _ in range(2):
            threads = Threads()
            seen: list[int] = []
            start = threading.Barrier(4, timeout=WAIT)

            def work() -> None:
                start.wait()  # noqa: B023
                for _ in range(5):
                    with db.transaction() as conn:
                        conn.exec_driver_sql("SELECT pg_sleep(0.005)")
                        seen.append(db.stats().open_connections)  # noqa: B023

            for _ in range(4):
                threads.start(work)
            threads.join()
            assert max(seen) <= 2
            assert db.stats().max_open_connections == 2
            assert settled(db, db_url, app) <= 2
            db.close()
            db.connect()  # the limits are the Database's: a new pool keeps them
    finally:
        db.close()


# -- the idle cap -----------------------------------------------------------------------------


def test_lowering_max_idle_closes_idle_connections_now(db_url: str, fast_paths: bool) -> None:
    app = unique_app("setters-idle")
    threads = Threads()
    with database(db_url, fast_paths, app, max_open_conns=6, max_idle_conns=6) as db:
        open_idle(db, threads, 5)
        assert settled(db, db_url, app) == 5

        db.set_max_idle_conns(2)
        stats = db.stats()  # at once, not at the next checkout
        assert stats.idle == 2 == stats.open_connections
        assert stats.max_idle_closed == 3
        assert settled(db, db_url, app) == 2

        db.set_max_idle_conns(0)  # none kept
        assert db.stats().open_connections == 0 and db.stats().max_idle_closed == 5
        assert db.scalar("SELECT 1") == 1  # the pool still works, and keeps nothing
        assert db.stats().open_connections == 0 and db.stats().max_idle_closed == 6
        assert settled(db, db_url, app) == 0

        db.set_max_idle_conns(10)  # capped at max_open_conns (6)
        open_idle(db, threads, 6)
        assert settled(db, db_url, app) == 6

        # max_open below max_idle lowers max_idle too, closing idle ones now.
        db.set_max_open_conns(3)
        stats = db.stats()
        assert stats.max_open_connections == 3
        assert stats.open_connections == 3 and stats.max_idle_closed == 9
        assert settled(db, db_url, app) == 3
        db.set_max_open_conns(6)  # raising it does not raise max_idle back (Go)
        open_idle(db, threads, 5)
        assert settled(db, db_url, app) == 3
        threads.join()


# -- lifetime and idle time ------------------------------------------------------------------


def pid(db: Database) -> int:
    value = db.scalar("SELECT pg_backend_pid()")
    assert isinstance(value, int)
    return value


def test_new_idle_time_applies_to_connections_already_open(db_url: str, fast_paths: bool) -> None:
    app = unique_app("setters-idletime")
    threads = Threads()
    with database(
        db_url, fast_paths, app, max_open_conns=4, max_idle_conns=4, conn_max_idle_time=0
    ) as db:
        open_idle(db, threads, 3)
        time.sleep(0.3)
        assert db.evict_expired() == 0  # no idle time yet: nothing expires
        db.set_conn_max_idle_time(0.2)  # idle 0.3 s already: closed now
        stats = db.stats()
        assert stats.open_connections == 0 and stats.max_idle_time_closed == 3
        assert settled(db, db_url, app) == 0

        first = pid(db)
        time.sleep(0.3)
        assert pid(db) != first  # checkout-time check
        assert db.stats().max_idle_time_closed == 4

        db.set_conn_max_idle_time(0)  # off again
        first = pid(db)
        time.sleep(0.3)
        assert pid(db) == first
        assert db.evict_expired() == 0
        threads.join()


def test_idle_time_set_at_run_time_closes_quiet_connections_in_the_background(
    db_url: str, fast_paths: bool
) -> None:
    app = unique_app("setters-cleaner")
    threads = Threads()
    with database(
        db_url, fast_paths, app, max_open_conns=4, max_idle_conns=4, conn_max_idle_time=0
    ) as db:
        open_idle(db, threads, 2)
        db.set_conn_max_idle_time(0.5)
        # No checkout from here on: only Go's connectionCleaner can close them.
        wait_for(lambda: db.stats().open_connections == 0, "the cleaner to close them")
        assert db.stats().max_idle_time_closed == 2
        assert settled(db, db_url, app) == 0
        threads.join()


def test_new_lifetime_applies_to_connections_already_open(db_url: str, fast_paths: bool) -> None:
    app = unique_app("setters-life")
    with database(db_url, fast_paths, app, conn_max_lifetime=0, conn_max_idle_time=0) as db:
        first = pid(db)
        time.sleep(0.3)
        db.set_conn_max_lifetime(0.2)  # made 0.3 s ago: closed now
        stats = db.stats()
        assert stats.open_connections == 0 and stats.max_lifetime_closed == 1

        second = pid(db)
        assert second != first
        time.sleep(0.3)
        assert pid(db) != second  # at checkout
        assert db.stats().max_lifetime_closed == 2

        # At return (Go's putConn): a connection that expires while in use is closed as
        # it comes back, not kept idle.
        with db.transaction() as conn:
            conn.exec_driver_sql("SELECT 1")
            time.sleep(0.3)
        stats = db.stats()
        assert stats.open_connections == 0 and stats.max_lifetime_closed == 3

        db.set_conn_max_lifetime(0)  # off again
        first = pid(db)
        time.sleep(0.3)
        assert pid(db) == first
        assert settled(db, db_url, app) == 1


# -- bad input, and after close() ------------------------------------------------------------


COUNT_SETTERS = ("set_max_open_conns", "set_max_idle_conns")
SECONDS_SETTERS = ("set_conn_max_lifetime", "set_conn_max_idle_time")


@pytest.mark.parametrize("setter", COUNT_SETTERS)
@pytest.mark.parametrize("value", [True, False, 2.0, 1.5, "3", None, Decimal(2)])
def test_connection_counts_must_be_ints(db: Database, setter: str, value: object) -> None:
    before = db.stats()
    with pytest.raises(TypeError, match="expected a number of connections"):
        getattr(db, setter)(value)
    assert db.stats() == before


@pytest.mark.parametrize("setter", SECONDS_SETTERS)
@pytest.mark.parametrize("value", [True, "1s", None, 1j])
def test_durations_must_be_numbers(db: Database, setter: str, value: object) -> None:
    with pytest.raises(TypeError, match="expected a number of seconds"):
        getattr(db, setter)(value)


@pytest.mark.parametrize("setter", SECONDS_SETTERS)
@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, -math.inf])
def test_durations_must_be_finite_and_not_negative(db: Database, setter: str, value: float) -> None:
    with pytest.raises(ValueError, match=setter.removeprefix("set_")):
        getattr(db, setter)(value)


def test_go_semantics_of_zero_and_negative_counts(db: Database) -> None:
    db.set_max_open_conns(-1)  # <= 0: unlimited
    assert db.stats().max_open_connections == 0
    db.set_max_open_conns(3)
    db.set_max_idle_conns(-5)  # <= 0: keep none idle
    db.scalar("SELECT 1")
    assert db.stats().open_connections == 0
    db.set_conn_max_lifetime(Fraction(1, 2))  # any real number of seconds
    db.set_conn_max_idle_time(0)


@pytest.mark.parametrize(
    ("setter", "value"),
    [
        ("set_max_open_conns", 3),
        ("set_max_idle_conns", 3),
        ("set_conn_max_lifetime", 1.0),
        ("set_conn_max_idle_time", 1.0),
    ],
)
def test_setters_raise_connect_error_once_closed(db: Database, setter: str, value: float) -> None:
    db.close()
    with pytest.raises(ConnectError, match="closed"):
        getattr(db, setter)(value)
    with pytest.raises(ConnectError, match="closed"):  # as any other call
        db.execute("SELECT 1")
