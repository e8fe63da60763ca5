"""Real faults against real servers, each checking that nothing is lost or duplicated:
a restart in the middle of a transaction batch, backends terminated while busy or idle, a
database down for longer than the retry window, pool exhaustion, statement and
idle-in-transaction timeouts, ``max_connections`` reached; then bad input (malformed
settings, SQL injection through the public API's string parameters, unicode, NUL bytes)
and ``is_transient`` on errors PostgreSQL really raised.

Private servers are few: one per module (with an awkward superuser password, so every URL
and conninfo layer has to carry it) for the restart/kill tests, one for the
``max_connections`` test; the rest use the session server's per-test database.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa

import dbkit
from dbkit import (
    CircuitOpenError,
    ConfigError,
    ConnectError,
    Database,
    PoolTimeoutError,
    PostgresConfig,
    RetryableError,
    TransactionError,
)
from dbkit.errors import sqlstate_of
from dbkit.local import LocalPostgres

# Every character that URLs, conninfo strings or shell quoting treat specially.
PASSWORD = "p@ss:w/rd?#%' \"\\;x"
SECRET = "Faults-S3cret-pw"


@pytest.fixture(scope="module")
def module_server() -> Iterator[LocalPostgres]:
    """A private server shared by this module's restart/kill tests (one initdb)."""
    server = LocalPostgres(password=PASSWORD)
    try:
        server.start()
        yield server
    finally:
        server.stop(mode="immediate")


@pytest.fixture
def server(module_server: LocalPostgres) -> LocalPostgres:
    """The module's server, running (a previous test may have left it stopped)."""
    return module_server.start()


def raw(server: LocalPostgres, **options: Any) -> psycopg.Connection[Any]:
    """A plain psycopg connection (keyword arguments: no URL quoting involved)."""
    params: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "password": server.password,
        "dbname": "postgres",
        "connect_timeout": 10,
    }
    params.update(options)
    return psycopg.connect(autocommit=True, **params)


def admin(db_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll ``condition`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def join_all(threads: list[threading.Thread], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t.name for t in threads if t.is_alive()], "threads still running: deadlock?"


def commit_outcome_unknown(error: BaseException) -> bool:
    """dbkit's "connection lost during COMMIT": the only failure after which the row may
    or may not be there (documented, never retried)."""
    return type(error) is TransactionError and "unknown" in str(error)


# ------------------------------------------------------------- 1. restart mid-batch


def test_restart_during_a_transaction_batch_loses_and_duplicates_nothing(
    server: LocalPostgres,
) -> None:
    total, workers = 200, 4
    db = Database.from_url(
        server.url,
        max_open_conns=workers,
        max_idle_conns=workers,
        timeout=2,
        max_retries=10,
        retry_delay=0.05,
        breaker_failure_threshold=3,
        breaker_recovery_timeout=0.2,
        health_check_interval=0,
    ).connect()
    db.execute("DROP TABLE IF EXISTS batch")
    # `k` deliberately not unique: a transaction applied twice must show up as two rows.
    db.execute("CREATE TABLE batch (id bigserial PRIMARY KEY, k int NOT NULL)")

    lock = threading.Lock()
    reconnect = threading.Lock()
    calls: Counter[int] = Counter()
    returned: set[int] = set()
    failed: dict[int, BaseException] = {}
    returned_after_restart: list[int] = []
    enough_done = threading.Event()
    restarted = threading.Event()
    restart_errors: list[BaseException] = []

    def insert(k: int) -> Callable[[Any], None]:
        def work(conn: Any) -> None:
            with lock:
                calls[k] += 1
            conn.execute(sa.text("INSERT INTO batch (k) VALUES (:k)"), {"k": k})
            # Keep transactions in flight, so that the shutdown catches some mid-way.
            conn.execute(sa.text("SELECT pg_sleep(0.005)"))

        return work

    def worker(keys: range) -> None:
        for k in keys:
            try:
                db.run_in_transaction(insert(k), retries=5)
            except Exception as error:
                with lock:
                    failed[k] = error
                if dbkit.is_transient(error) or isinstance(error, CircuitOpenError):
                    # What a batch job does: wait for the database, then go on.
                    with reconnect, contextlib.suppress(ConnectError):
                        db.connect()
                continue
            with lock:
                returned.add(k)
                if restarted.is_set():
                    returned_after_restart.append(k)
                if len(returned) >= total // 5:
                    enough_done.set()

    def restarter() -> None:
        try:
            if enough_done.wait(timeout=60):
                server.restart()
                restarted.set()
        except BaseException as error:  # reported by the main thread
            restart_errors.append(error)

    old_pid = server.pid
    threads = [threading.Thread(target=restarter, name="restarter")]
    share = total // workers
    threads += [
        threading.Thread(target=worker, args=(range(i * share, (i + 1) * share),), name=f"w{i}")
        for i in range(workers)
    ]
    try:
        for t in threads:
            t.start()
        join_all(threads, timeout=180)
        assert not restart_errors
        assert restarted.is_set() and server.pid != old_pid

        with raw(server) as conn:
            rows = Counter(k for (k,) in conn.execute("SELECT k FROM batch"))

        assert len(returned) + len(failed) == total
        assert not returned & failed.keys()
        unknown = {k for k, error in failed.items() if commit_outcome_unknown(error)}
        for k in returned:
            assert rows[k] == 1, f"transaction {k} returned but is stored {rows[k]} times"
        for k in failed.keys() - unknown:
            assert rows[k] == 0, f"transaction {k} raised {failed[k]!r} but is stored"
        for k in unknown:
            assert rows[k] <= 1
        assert sum(rows.values()) == len(returned) + sum(rows[k] for k in unknown)
        assert set(rows) <= set(range(total))
        assert all(calls[k] >= 1 for k in returned)

        # Every failure is a dbkit error saying what happened.
        kinds = Counter(type(error).__name__ for error in failed.values())
        assert all(isinstance(e, dbkit.DbkitError) for e in failed.values()), kinds
        assert set(kinds) <= {
            "ConnectError",
            "CircuitOpenError",
            "RetryableError",
            "TransactionError",
        }, kinds
        # The batch went on after the server came back, on a healthy pool.
        assert returned_after_restart
        assert db.stats().in_use == 0
    finally:
        db.close()


def test_run_in_transaction_waits_for_an_unreachable_server_without_spending_retries(
    server: LocalPostgres,
) -> None:
    """A transaction whose connection is lost is re-run (one of its ``retries``); a re-run
    that cannot even get a connection because the server is away (refused, shutting down,
    starting up: nothing was sent) waits with the connect policy (``max_retries`` waits)
    instead of spending ``retries``, and gives up with the ConnectError when the server
    stays away past that budget."""
    db = Database.from_url(
        server.url,
        timeout=2,
        max_retries=2,
        retry_delay=0.05,
        breaker_failure_threshold=0,
        health_check_interval=0,
    ).connect()
    calls: list[int] = []

    def work(conn: Any) -> None:
        calls.append(1)
        conn.exec_driver_sql("SELECT 1")
        if len(calls) == 1:
            server.kill()  # the server goes away mid-transaction, and stays away
        conn.exec_driver_sql("SELECT 1")

    try:
        with pytest.raises(ConnectError) as info:
            db.run_in_transaction(work, retries=3)
        assert dbkit.is_transient(info.value)
        assert len(calls) == 1  # no re-run could start: the server never came back
        # One re-run was spent on the lost connection; the waits for the server were not.
        assert db.query_stats().transactions_retried == 1
    finally:
        db.close()


def test_run_in_transaction_rides_out_a_restart_longer_than_its_retries(
    server: LocalPostgres,
) -> None:
    """retries=1 with the server down for longer than one re-run's backoff: the re-run
    waits for the server (connect policy) and then succeeds, exactly once."""
    db = Database.from_url(
        server.url,
        timeout=2,
        max_retries=8,
        retry_delay=0.1,
        breaker_failure_threshold=0,
        health_check_interval=0,
    ).connect()
    with db.transaction() as conn:
        # The test server runs with synchronous_commit=off; a crash could lose this.
        conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
        conn.exec_driver_sql("CREATE TABLE ridden (k int)")
    calls: list[int] = []
    stopped, restarted = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            server.kill()  # stop() would delete the module's temporary cluster
            stopped.set()
            time.sleep(1.0)  # longer than a re-run's backoff (20 ms here)
            server.start()
            restarted.set()
        except BaseException as error:
            errors.append(error)
            stopped.set()

    restarter = threading.Thread(target=restart)

    def work(conn: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            restarter.start()
            assert stopped.wait(60)
        # First run: the connection is gone; the re-run meets a refused connect first.
        conn.exec_driver_sql("INSERT INTO ridden VALUES (1)")

    try:
        db.run_in_transaction(work, retries=1)
        restarter.join(timeout=60)
        assert not errors
        assert restarted.is_set()
        assert len(calls) == 2
        assert db.scalar("SELECT count(*) FROM ridden") == 1
        assert db.query_stats().transactions_retried == 1
    finally:
        db.close()


# ------------------------------------------------ 2. pg_terminate_backend busy and idle


def test_terminated_busy_caller_gets_a_transient_error_and_idle_ones_are_replaced(
    db_url: str,
) -> None:
    app = "faults-terminate"
    db = Database.from_url(db_url, max_open_conns=4, max_idle_conns=4, application_name=app)
    db.connect()
    try:
        # Three idle pooled connections.
        barrier = threading.Barrier(3, timeout=30)

        def hold() -> None:
            with db.transaction() as conn:
                conn.exec_driver_sql("SELECT 1")
                barrier.wait()

        fillers = [threading.Thread(target=hold) for _ in range(3)]
        for t in fillers:
            t.start()
        join_all(fillers)
        assert db.stats().idle == 3

        errors: list[BaseException] = []

        def busy() -> None:
            try:
                # A read would run again on a fresh connection: not this one.
                db.execute("SELECT pg_sleep(60)", idempotent=False)
            except BaseException as error:
                errors.append(error)

        caller = threading.Thread(target=busy)
        caller.start()
        with admin(db_url) as conn:
            busy_pid = wait_for(
                lambda: conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                    "AND state = 'active' AND query LIKE %s",
                    (app, "%pg_sleep(60)%"),
                ).fetchone(),
                "the busy statement",
            )[0]
            pids = {
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
                )
            }
            assert busy_pid in pids and len(pids) == 3  # one busy, two idle
            conn.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            )
        join_all([caller], timeout=15)

        # The busy caller: a clear, transient error carrying PostgreSQL's reason.
        [error] = errors
        assert isinstance(error, sa.exc.OperationalError), repr(error)
        assert sqlstate_of(error) == "57P01"
        assert "terminating connection due to administrator command" in str(error)
        assert dbkit.is_transient(error)
        assert error.connection_invalidated

        # The idle ones: replaced before any caller sees them.  Three callers at once, so
        # that every pooled connection is taken.
        seen: set[int] = set()
        failures: list[BaseException] = []
        together = threading.Barrier(3, timeout=30)

        def use() -> None:
            try:
                with db.transaction() as conn:
                    seen.add(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
                    together.wait()
            except BaseException as error:
                failures.append(error)

        for _ in range(2):
            users = [threading.Thread(target=use) for _ in range(3)]
            for t in users:
                t.start()
            join_all(users)
        assert not failures, failures
        assert len(seen) == 3 and not seen & pids
        stats = db.stats()
        assert stats.in_use == 0 and stats.open_connections == 3
        assert stats.connects == 3 + 3  # the three first ones, then three replacements
    finally:
        db.close()


def test_terminated_busy_transaction_is_rerun_once_by_run_in_transaction(db_url: str) -> None:
    app = "faults-terminate-tx"
    db = Database.from_url(db_url, application_name=app).connect()
    try:
        db.execute("CREATE TABLE items (k int NOT NULL)")
        attempts: list[int] = []
        outcome: list[object] = []

        def work(conn: Any) -> str:
            attempts.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
            conn.exec_driver_sql("INSERT INTO items VALUES (1)")
            if len(attempts) == 1:
                conn.exec_driver_sql("SELECT pg_sleep(60)")  # killed here
            return "done"

        def run() -> None:
            try:
                outcome.append(db.run_in_transaction(work, retries=2))
            except BaseException as error:
                outcome.append(error)

        caller = threading.Thread(target=run)
        caller.start()
        with admin(db_url) as conn:
            pid = wait_for(
                lambda: conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                    "AND query LIKE %s",
                    (app, "%pg_sleep(60)%"),
                ).fetchone(),
                "the busy transaction",
            )[0]
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        join_all([caller], timeout=15)
        assert outcome == ["done"]
        assert len(attempts) == 2 and attempts[0] != attempts[1]
        assert db.scalar("SELECT count(*) FROM items") == 1  # rolled back once, applied once
        assert db.query_stats().transactions_retried == 1
        assert db.stats().in_use == 0
    finally:
        db.close()


# ------------------------------------------- 3. down for longer than the retry window


def test_database_down_longer_than_the_retry_window(server: LocalPostgres) -> None:
    db = Database.from_url(
        server.url,
        max_retries=4,
        retry_delay=0.05,
        timeout=2,
        breaker_failure_threshold=3,
        breaker_recovery_timeout=0.2,
        health_check_interval=0,
    ).connect()
    try:
        db.execute("DROP TABLE IF EXISTS kept")
        db.execute("CREATE TABLE kept (k int)")
        with db.transaction() as conn:
            # The test server runs with synchronous_commit=off; a crash (kill) could lose
            # an asynchronous commit, which is not what this test is about.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
            conn.exec_driver_sql("INSERT INTO kept VALUES (1)")

        server.kill()
        db.connect()  # idempotent: connected already, it returns without a round trip
        db.close()  # to connect again: close() first
        with pytest.raises(ConnectError) as info:
            db.connect()
        text = str(info.value)
        assert db.connect_attempts == 5  # max_retries + 1
        assert "after 5 attempt(s)" in text and "retries exhausted" in text
        assert "connection refused" in text.lower().split("(after")[0]  # the cause, first
        assert dbkit.is_transient(info.value)
        assert PASSWORD not in text
        # connect()'s own retries are the waiting: they do not open the breaker.
        assert db.breaker.times_opened == 0 and db.breaker.state == "closed"
        health = db.health()
        assert health.ok is False and health.error
        assert db.breaker.state == "closed"  # one failure (threshold 3)

        # Callers meanwhile: each gets a prompt dbkit error, nobody hangs.
        errors: list[BaseException] = []

        def call() -> None:
            try:
                db.execute("SELECT 1")
            except BaseException as error:
                errors.append(error)

        callers = [threading.Thread(target=call) for _ in range(4)]
        for t in callers:
            t.start()
        join_all(callers, timeout=30)
        assert len(errors) == 4
        assert all(isinstance(e, (ConnectError, CircuitOpenError)) for e in errors), errors
        assert db.breaker.times_opened >= 1  # the callers' failures opened it
        state_while_down: str = db.breaker.state
        assert state_while_down in ("open", "half_open")

        server.start()
        db.connect()  # not connected since the failure: connects, past the open breaker
        assert db.breaker.state == "closed"
        assert db.scalar("SELECT count(*) FROM kept") == 1  # nothing committed was lost
        assert db.health().ok
        assert db.stats().in_use == 0
    finally:
        db.close()


# ---------------------------------------------------------------- 4. pool exhaustion


def test_pool_exhaustion_with_four_times_more_threads_than_connections(db_url: str) -> None:
    threads_n, rounds = 8, 3
    db = Database.from_url(db_url, max_open_conns=2, max_idle_conns=2, timeout=0.1).connect()
    successes: list[int] = []
    timeouts: list[PoolTimeoutError] = []
    others: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_n, timeout=30)

    def work() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                with db.transaction() as conn:
                    # Held longer than a waiter may wait: some must time out.
                    conn.exec_driver_sql("SELECT pg_sleep(0.25)")
            except PoolTimeoutError as error:
                with lock:
                    timeouts.append(error)
            except BaseException as error:
                with lock:
                    others.append(error)
            else:
                with lock:
                    successes.append(1)

    try:
        threads = [threading.Thread(target=work) for _ in range(threads_n)]
        for t in threads:
            t.start()
        join_all(threads, timeout=120)
        assert not others, others
        attempts = threads_n * rounds
        assert len(successes) + len(timeouts) == attempts
        assert len(successes) >= 2 and timeouts
        for error in timeouts:
            text = str(error)
            assert "max_open_conns=2" in text and "max_idle_conns=2" in text, text
            assert "in use" in text and "0.1s" in text, text
            assert isinstance(error.__cause__, sa.exc.TimeoutError)
        stats = db.stats()
        assert stats.wait_timeouts == len(timeouts)
        assert len(timeouts) <= stats.wait_count <= attempts
        assert stats.wait_duration > 0
        assert stats.in_use == 0
        assert stats.open_connections <= 2 and stats.max_open_connections == 2
        # Saturation is not a database fault: the breaker stays shut.
        assert db.breaker.state == "closed" and db.breaker.times_opened == 0
        assert db.scalar("SELECT 1") == 1
    finally:
        db.close()


# ---------------------------------------------------------------- 5. statement timeout


def test_statement_timeout_cancels_with_57014_not_retried_pool_healthy(db_url: str) -> None:
    db = Database.from_url(db_url, statement_timeout=0.2).connect()
    try:
        with pytest.raises(sa.exc.OperationalError) as info:
            db.execute("SELECT pg_sleep(1)")
        assert isinstance(info.value.orig, psycopg.errors.QueryCanceled)
        assert sqlstate_of(info.value) == "57014"
        assert "canceling statement due to statement timeout" in str(info.value)
        assert not dbkit.is_transient(info.value)

        calls = []

        def slow(conn: Any) -> None:
            calls.append(1)
            conn.exec_driver_sql("SELECT pg_sleep(1)")

        with pytest.raises(Exception) as info2:
            db.run_in_transaction(slow, retries=3)
        assert len(calls) == 1  # a cancelled statement is the caller's business, not retried
        assert sqlstate_of(info2.value) == "57014"
        assert not dbkit.is_transient(info2.value)

        # The connection survived the cancel and went back to the pool in good order.
        assert db.scalar("SHOW statement_timeout") == "200ms"
        assert db.scalar("SELECT 1") == 1
        stats = db.stats()
        assert stats.in_use == 0 and stats.invalidated == 0
        assert not db.in_transaction()
    finally:
        db.close()


# ---------------------------------------------------- 6. server max_connections reached


def test_max_connections_reached_is_transient_and_recovers_when_a_slot_frees(
    make_server: Any,
) -> None:
    # PostgreSQL 15: superuser_reserved_connections (reserved_connections is 16+).
    server = make_server(max_connections=5, superuser_reserved_connections=0)
    held = [raw(server) for _ in range(5)]
    try:
        with pytest.raises(psycopg.OperationalError) as direct:
            raw(server)
        assert "too many clients" in str(direct.value)
        assert dbkit.is_transient(direct.value)

        db = Database.from_url(
            server.url, max_retries=2, retry_delay=0.02, breaker_failure_threshold=0
        )
        with pytest.raises(ConnectError) as info:
            db.connect()
        text = str(info.value)
        assert db.connect_attempts == 3
        assert "too many clients" in text and "retries exhausted" in text, text
        assert dbkit.is_transient(info.value)
        db.close()

        # The breaker is off here: with it on, enough "too many clients" refusals open it
        # for breaker_recovery_timeout, which is the breaker's job, tested elsewhere.
        db = Database.from_url(
            server.url, max_retries=30, retry_delay=0.05, breaker_failure_threshold=0
        )
        release = threading.Timer(0.3, held.pop().close)
        release.start()
        try:
            db.connect()
        finally:
            release.join(10)
        assert db.connect_attempts > 1
        assert db.scalar("SELECT 1") == 1
        db.close()
    finally:
        for conn in held:
            conn.close()


# --------------------------------------------- 7. idle_in_transaction_session_timeout


def test_idle_in_transaction_timeout_ends_the_transaction_and_the_connection_is_replaced(
    db_url: str,
) -> None:
    db = Database.from_url(
        db_url, idle_in_transaction_session_timeout=0.3, max_open_conns=1, max_idle_conns=1
    ).connect()
    try:
        db.execute("CREATE TABLE t (k int)")
        pid = db.scalar("SELECT pg_backend_pid()")
        time.sleep(0.5)  # idle *outside* a transaction: the setting leaves it alone
        assert db.scalar("SELECT pg_backend_pid()") == pid

        with pytest.raises(RetryableError) as info:
            with db.transaction() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")
                time.sleep(0.8)  # let the server's idle-in-transaction timeout fire
                conn.exec_driver_sql("INSERT INTO t VALUES (2)")
        assert "idle-in-transaction timeout" in str(info.value.__cause__)
        assert sqlstate_of(info.value) == "25P03"
        assert dbkit.is_transient(info.value)

        assert db.scalar("SELECT count(*) FROM t") == 0  # nothing of it was kept
        assert db.scalar("SELECT pg_backend_pid()") != pid  # the dead one was not reused
        stats = db.stats()
        assert stats.in_use == 0 and stats.invalidated >= 1
    finally:
        db.close()


# ------------------------------------------------------------ 8. bad input: settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("DBKIT_") or var == "DATABASE_URL":
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("clean_env")
def test_malformed_settings_from_file_and_env_are_all_reported_in_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text(
        "[default.database.postgres]\n"
        "port = 70000\n"
        'max_open_conns = "lots"\n'
        'retry_delay = "nan"\n'
        'health_check_interval = "1e400"\n'
        'statement_timeout = "0.2; DROP TABLE canary"\n'
        "application_name = 42\n"
        'sslmode = "require host=evil.example"\n'
        "[default.log]\n"
        'json = "maybe"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__MAX_RETRIES", "-1")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__TIMEOUT", "0")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__CONN_MAX_IDLE_TIME", "5 minutes")
    monkeypatch.setenv("DBKIT_DATABASE__POSTGRES__PASSWORD", SECRET)
    with pytest.raises(ConfigError) as info:
        dbkit.load_settings(settings_files=[settings_file])
    fields = {problem.split(":", 1)[0] for problem in info.value.problems}
    assert fields == {
        "database.postgres.port",
        "database.postgres.max_open_conns",
        "database.postgres.retry_delay",
        "database.postgres.health_check_interval",
        "database.postgres.statement_timeout",
        "database.postgres.application_name",
        "database.postgres.sslmode",
        "database.postgres.max_retries",
        "database.postgres.timeout",
        "database.postgres.conn_max_idle_time",
        "log.json",
    }
    assert len(info.value.problems) == len(fields)
    text = str(info.value)
    assert f"{len(fields)} problem(s)" in text
    assert SECRET not in text and SECRET not in repr(info.value)
    assert "env:DBKIT_DATABASE__POSTGRES__TIMEOUT" in text  # says where each came from


STRING_FIELDS = ("host", "name", "username", "password", "application_name", "sslrootcert")


def test_nul_byte_in_a_connection_setting_is_a_config_error() -> None:
    """libpq reads its connection string as a C string: a NUL cuts it short, and every
    setting after it (port, sslmode …) silently falls back to libpq's default, e.g. a
    password "p\\0w" makes dbkit connect to localhost:5432 without the configured sslmode.
    Such a value must be refused when the settings are built, naming the field and not the
    value."""
    accepted = []
    for field in STRING_FIELDS:
        try:
            PostgresConfig(**{field: f"{SECRET}\x00x"})  # type: ignore[arg-type]
        except ConfigError as error:
            assert field in str(error)
            assert SECRET not in str(error)
        else:
            accepted.append(field)
    assert not accepted, f"NUL byte accepted in {accepted}"


def test_nul_byte_in_a_database_url_is_a_config_error() -> None:
    url = f"postgresql://app:{SECRET}%00x@127.0.0.1:1/db?sslmode=verify-full"
    with pytest.raises(ConfigError) as info:
        PostgresConfig.from_url(url)
    assert SECRET not in str(info.value)


# ------------------------------------------------------ 8. bad input: SQL injection

INJECTIONS = (
    "'); DROP TABLE canary; --",
    "1; DROP TABLE canary",
    "' OR '1'='1",
    "$$; DROP TABLE canary; $$",
    "\\'; DROP TABLE canary; --",
    "%(x)s %s :x ? $1",
    "*/ DROP TABLE canary /*",
    "serializable; DROP TABLE canary",
)


@pytest.fixture
def canary(db: Database) -> Database:
    db.execute("CREATE TABLE canary (id int PRIMARY KEY, note text NOT NULL)")
    db.execute("INSERT INTO canary VALUES (0, 'alive')")
    return db


def assert_canary_alive(db: Database) -> None:
    assert db.scalar("SELECT note FROM canary WHERE id = 0") == "alive"


def test_injection_in_statement_parameters_is_stored_verbatim(canary: Database) -> None:
    db = canary
    for i, value in enumerate(INJECTIONS, start=1):
        db.execute("INSERT INTO canary (id, note) VALUES (:id, :note)", {"id": i, "note": value})
        assert db.scalar("SELECT note FROM canary WHERE id = :id", {"id": i}) == value
        assert db.scalar("SELECT :v", {"v": value}) == value
        with db.transaction() as conn:
            found = conn.execute(
                sa.text("SELECT count(*) FROM canary WHERE note = :v"), {"v": value}
            ).scalar()
        assert found == 1
    assert db.scalar("SELECT count(*) FROM canary") == len(INJECTIONS) + 1
    assert_canary_alive(db)


def test_injection_in_transaction_options_is_rejected_before_any_sql(canary: Database) -> None:
    db = canary
    connects = db.stats().connects
    called: list[object] = []
    for value in INJECTIONS:
        with pytest.raises(TransactionError, match="unknown isolation level"):
            db.transaction(isolation=value)
        with pytest.raises(TransactionError, match="unknown isolation level"):
            db.run_in_transaction(lambda conn: called.append(conn), isolation=value)
        with pytest.raises((TransactionError, TypeError)):
            with db.transaction(timeout=value):  # type: ignore[call-overload]
                called.append("timeout")
    assert not called
    assert db.stats().connects == connects and db.stats().in_use == 0
    # savepoint is a flag, its names are dbkit's own: a string is just "true".
    with db.transaction():
        with db.transaction(savepoint="'; DROP TABLE canary; --"):  # type: ignore[call-overload]
            db.execute("INSERT INTO canary VALUES (100, 'sp')")
    assert db.scalar("SELECT note FROM canary WHERE id = 100") == "sp"
    assert_canary_alive(db)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0])
def test_invalid_transaction_timeout_is_rejected_before_any_sql(
    canary: Database, timeout: float
) -> None:
    db = canary
    with pytest.raises(TransactionError, match="timeout"):
        with db.transaction(timeout=timeout):
            pass
    with pytest.raises(TransactionError, match="timeout"):
        db.run_in_transaction(lambda conn: None, timeout=timeout)
    assert not db.in_transaction() and db.stats().in_use == 0
    assert_canary_alive(db)


@pytest.mark.parametrize(
    "name",
    [
        "x' -c log_statement=all",
        "x -c log_statement=all",
        "x' options='-c log_statement=all",
        "x\\' -c search_path=evil",
    ],
)
def test_application_name_is_data_not_connection_options(
    canary: Database, db_url: str, name: str
) -> None:
    log_statement = canary.scalar("SHOW log_statement")
    search_path = canary.scalar("SHOW search_path")
    for target, overrides in (
        (db_url, {"application_name": name}),
        (f"{db_url}?application_name={quote(name)}", {}),
    ):
        with Database.from_url(target, **overrides) as db:
            assert db.config.application_name == name
            assert db.scalar("SELECT current_setting('application_name')") == name
            assert db.scalar("SHOW log_statement") == log_statement
            assert db.scalar("SHOW search_path") == search_path
    assert_canary_alive(canary)


def test_injection_in_settings_strings_is_rejected(canary: Database, db_url: str) -> None:
    for overrides in (
        {"statement_timeout": "0.2; DROP TABLE canary"},
        {"sslmode": "disable; DROP TABLE canary"},
        {"port": "5432; DROP TABLE canary"},
        {"max_open_conns": "1 OR 1=1"},
    ):
        with pytest.raises(ConfigError):
            Database.from_url(db_url, **overrides)
    with pytest.raises(ConfigError):
        dbkit.load_settings(env="production; DROP TABLE canary", settings_files=[])
    assert_canary_alive(canary)


def test_odd_database_and_user_names_fail_cleanly(canary: Database, db_url: str) -> None:
    base = sa.make_url(db_url)
    for url in (
        base.set(database="canary'; DROP TABLE canary; --"),
        base.set(username="postgres' --"),
        base.set(database='x" OR "1"="1'),
    ):
        db = Database.from_url(url, max_retries=3, retry_delay=0.05)
        with pytest.raises(ConnectError) as info:
            db.connect()
        assert db.connect_attempts == 1 and "does not exist" in str(info.value)
        assert not dbkit.is_transient(info.value)
        db.close()
    assert_canary_alive(canary)


def test_url_with_every_special_character_in_the_password_round_trips(
    server: LocalPostgres,
) -> None:
    config = PostgresConfig.from_url(server.url)
    assert config.password == PASSWORD
    assert PASSWORD not in repr(config) and PASSWORD not in config.safe_dsn()
    with Database(config) as db:
        assert db.scalar("SELECT current_user") == "postgres"
    with Database.from_url(config.url()) as db:
        assert db.scalar("SELECT 1") == 1
    # The wrong password differs from the right one only in its last character; building the
    # URL with SQLAlchemy (not by replacing a guessed quoting in the text) makes sure this
    # branch always runs and that the special characters really reach the server both times.
    almost = PASSWORD[:-1]
    wrong = sa.make_url(server.url).set(password=almost).render_as_string(hide_password=False)
    assert wrong != server.url and sa.make_url(wrong).password == almost
    assert PostgresConfig.from_url(wrong).password == almost
    with pytest.raises(ConnectError) as info:
        Database.from_url(wrong, max_retries=0).connect()
    assert not dbkit.is_transient(info.value)  # authentication failed: permanent
    assert "password authentication failed" in str(info.value)
    assert almost not in str(info.value) and quote(almost, safe="") not in str(info.value)
    # The server still accepts the right one afterwards (the failure was the password's).
    with Database.from_url(server.url, max_retries=0) as db:
        assert db.scalar("SELECT 1") == 1


@pytest.mark.skipif(
    importlib.util.find_spec("dbkit.repository") is None, reason="dbkit.repository not there yet"
)
def test_injection_through_repository_names_is_rejected_and_values_are_data(
    canary: Database,
) -> None:
    from dataclasses import dataclass

    from dbkit.repository import Repository

    canary_table = sa.Table(
        "canary",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", sa.Text, nullable=False),
    )

    @dataclass
    class Note:
        id: int
        note: str

    class Notes(Repository[Note]):
        table = canary_table
        model = Note

    repo = Notes(canary)
    evil = "note; DROP TABLE canary; --"
    bad: dict[str, Any] = {evil: "x"}
    attempts: list[Callable[[], Any]] = [
        lambda: repo.list(**bad),
        lambda: repo.count(**bad),
        lambda: repo.exists(**bad),
        lambda: repo.get_one_or_none(**bad),
        lambda: repo.list(order_by=evil),
        lambda: repo.page(order_by=evil),
        lambda: list(repo.stream(**bad)),
        lambda: repo.add({"id": 5, evil: "x"}),
        lambda: repo.add_many([{"id": 5, evil: "x"}]),
        lambda: repo.insert_many([{"id": 5, evil: "x"}]),
        lambda: repo.update(0, **bad),
        lambda: repo.update_where(sa.true(), **bad),
        lambda: repo.delete_where(**bad),
        lambda: repo.upsert({"id": 0, "note": "x"}, conflict=(evil,)),
        lambda: repo.bulk_load([(7, "x")], columns=["id", evil]),
        lambda: repo.like(evil, "x"),
    ]
    for attempt in attempts:
        with pytest.raises(ValueError):
            attempt()
    for i, value in enumerate(INJECTIONS, start=1):
        assert repo.add({"id": i, "note": value}).note == value
        assert [n.id for n in repo.list(note=value)] == [i]
        assert [n.id for n in repo.list(repo.like("note", value))] == [i]
    assert repo.count(note="' OR '1'='1") == 1
    assert repo.bulk_load([(50, INJECTIONS[0])], columns=["id", "note"]) == 1
    assert repo.get(50).note == INJECTIONS[0]
    assert_canary_alive(canary)


# --------------------------------------------------------- 8. bad input: unicode, NUL

UNICODE = (
    "😀",
    "👩‍👩‍👧‍👦",  # ZWJ sequence
    "שלום עולם",  # RTL
    "مرحبا بالعالم",
    "\u202egnirts desrever",  # right-to-left override
    "e\u0301",  # combining accent: must not be normalised to "é"
    "é",
    "\ufeffBOM",
    "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 ∑ ≠ ∞",  # fraktur letters
    "a\tb\nc\r\\",
)


def test_unicode_round_trips_exactly(db: Database) -> None:
    db.execute("CREATE TABLE texts (id int PRIMARY KEY, v text NOT NULL)")
    with db.transaction():
        for i, value in enumerate(UNICODE):
            db.execute("INSERT INTO texts VALUES (:i, :v)", {"i": i, "v": value})
    stored = {r.id: r.v for r in db.execute("SELECT id, v FROM texts")}
    assert stored == dict(enumerate(UNICODE))
    lengths = {r.id: r.n for r in db.execute("SELECT id, char_length(v) AS n FROM texts")}
    assert lengths == {i: len(v) for i, v in enumerate(UNICODE)}
    for i, value in enumerate(UNICODE):
        assert db.scalar("SELECT id FROM texts WHERE v = :v", {"v": value}) == i
        assert db.scalar("SELECT :v", {"v": value}) == value


def test_nul_byte_in_a_value_is_a_clear_error_and_nothing_is_half_written(db: Database) -> None:
    db.execute("CREATE TABLE texts (id int PRIMARY KEY, v text NOT NULL)")
    with pytest.raises(sa.exc.DataError) as info:
        with db.transaction():
            db.execute("INSERT INTO texts VALUES (1, 'first')")
            db.execute("INSERT INTO texts VALUES (2, :v)", {"v": "a\x00b"})
    assert "NUL" in str(info.value)
    assert "a\x00b" not in str(info.value)  # parameters stay out of error text
    with pytest.raises(sa.exc.DataError):
        db.execute("INSERT INTO texts VALUES (3, :v)", {"v": "\x00"})
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        db.execute("INSERT INTO texts VALUES (4, :v)", {"v": "lone \ud800"})
    assert db.scalar("SELECT count(*) FROM texts") == 0
    assert db.scalar("SELECT 1") == 1 and db.stats().in_use == 0


def test_nul_byte_in_a_multi_row_execute_writes_no_row(db: Database) -> None:
    db.execute("CREATE TABLE texts (id int PRIMARY KEY, v text NOT NULL)")
    rows = [{"i": 1, "v": "x"}, {"i": 2, "v": "y"}, {"i": 3, "v": "bad\x00"}]
    with pytest.raises(sa.exc.DataError):
        db.execute("INSERT INTO texts VALUES (:i, :v)", rows)  # type: ignore[arg-type]
    assert db.scalar("SELECT count(*) FROM texts") == 0


# ---------------------------------------------- classification of real errors


def caught(action: Callable[[], Any]) -> BaseException:
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("expected an error")


def test_is_transient_on_real_connect_errors(
    free_port: int, db_url: str, server: LocalPostgres
) -> None:
    def connect(url: str, **kw: Any) -> None:
        Database.from_url(url, max_retries=0, **kw).connect()

    refused_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port}/postgres"
    refused = caught(lambda: psycopg.connect(refused_url.replace("+psycopg", "")))
    assert "refused" in str(refused).lower()
    assert dbkit.is_transient(refused)
    assert dbkit.is_transient(caught(lambda: connect(refused_url)))

    unknown_db = db_url.rsplit("/", 1)[0] + "/no_such_database"
    error = caught(lambda: psycopg.connect(unknown_db.replace("+psycopg", "")))
    assert "does not exist" in str(error) and not dbkit.is_transient(error)
    assert not dbkit.is_transient(caught(lambda: connect(unknown_db)))

    bad_password = caught(lambda: raw(server, password=SECRET))
    assert "password authentication failed" in str(bad_password)
    assert not dbkit.is_transient(bad_password)
    wrong = sa.make_url(server.url).set(password=SECRET)
    error = caught(lambda: connect(wrong.render_as_string(hide_password=False)))
    assert isinstance(error, ConnectError) and not dbkit.is_transient(error)
    assert SECRET not in str(error) and PASSWORD not in str(error)


def test_is_transient_on_real_statement_errors(db: Database, db_url: str) -> None:
    serialization = caught(
        lambda: db.execute("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END $$")
    )
    assert sqlstate_of(serialization) == "40001" and dbkit.is_transient(serialization)

    db.execute("CREATE TABLE uniq (k int PRIMARY KEY)")
    db.execute("INSERT INTO uniq VALUES (1)")
    duplicate = caught(lambda: db.execute("INSERT INTO uniq VALUES (1)"))
    assert sqlstate_of(duplicate) == "23505" and not dbkit.is_transient(duplicate)

    def cancelled() -> None:
        with db.transaction(timeout=0.05):
            db.execute("SELECT pg_sleep(1)")

    cancel = caught(cancelled)
    assert sqlstate_of(cancel) == "57014" and not dbkit.is_transient(cancel)

    app = "faults-classify"
    with Database.from_url(db_url, application_name=app) as victim:

        def terminated() -> None:
            with victim.transaction() as conn:
                conn.exec_driver_sql("SELECT 1")
                with admin(db_url) as other:
                    other.execute(
                        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                        "WHERE application_name = %s",
                        (app,),
                    )
                conn.exec_driver_sql("SELECT 1")

        shutdown = caught(terminated)
        assert sqlstate_of(shutdown) == "57P01" and dbkit.is_transient(shutdown)
        assert isinstance(shutdown, RetryableError)
    assert db.stats().in_use == 0
