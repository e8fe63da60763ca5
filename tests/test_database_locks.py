"""``db.advisory_lock``: named advisory locks against a real PostgreSQL, with a second
session (a raw psycopg connection, or another thread's) contending for them."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import dbkit
from dbkit import Database, LockNotAvailable, RetryableError, advisory_key

KEY = advisory_key("nightly-import")
# Generous bound for "the other side got there": never a timing assertion, only how long a
# poll may take before the test gives up.
PATIENCE = 20.0


def plain(url: str) -> str:
    return url.replace("+psycopg", "")


@pytest.fixture
def other(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session on the test's database, as a second job would have."""
    with psycopg.connect(plain(db_url), autocommit=True, application_name="other-job") as conn:
        yield conn


def try_lock(conn: psycopg.Connection[Any], key: int = KEY) -> bool:
    """Whether ``conn`` can take the session lock ``key`` now (released again at once)."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    assert row is not None
    if row[0]:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    return bool(row[0])


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def waiting_for(conn: psycopg.Connection[Any], key: int = KEY) -> bool:
    """Whether some session waits (not granted) for the advisory lock ``key``."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
        (unsigned >> 32, unsigned & 0xFFFFFFFF),
    ).fetchone()
    return row is not None and row[0] > 0


class Worker(threading.Thread):
    """Runs ``target``; its exception is raised again by ``result()`` in the test."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None
        self.value: Any = None

    def run(self) -> None:
        try:
            self.value = self._target_fn()
        except BaseException as error:
            self.error = error

    def result(self) -> Any:
        self.join(PATIENCE)
        assert not self.is_alive(), "the worker thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


# ------------------------------------------------------------------------------ keys


def test_advisory_key_is_a_stable_signed_64_bit_blake2b() -> None:
    assert advisory_key("nightly-import") == 544098103861056362  # pinned: never changes
    digest = hashlib.blake2b("zürich".encode(), digest_size=8).digest()
    assert advisory_key("zürich") == int.from_bytes(digest, "big", signed=True)
    assert advisory_key(-(2**63)) == -(2**63) and advisory_key(42) == 42
    assert advisory_key("a") != advisory_key("b")
    assert dbkit.advisory_key is advisory_key


@pytest.mark.parametrize(
    ("name", "error", "text"),
    [
        ("", ValueError, "must not be empty"),
        ("   ", ValueError, "must not be empty"),
        (2**63, ValueError, "64-bit"),
        (-(2**63) - 1, ValueError, "64-bit"),
        (None, TypeError, "str or an int"),
        (True, TypeError, "str or an int"),
        (1.5, TypeError, "str or an int"),
        (b"job", TypeError, "str or an int"),
    ],
)
def test_bad_names_are_refused_before_any_connection(
    db: Database, name: Any, error: type[Exception], text: str
) -> None:
    before = db.stats()
    with pytest.raises(error, match=text), db.advisory_lock(name):
        pytest.fail("the body ran")
    assert db.stats() == before


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"timeout": -1}, ValueError, "positive, finite"),
        ({"timeout": 0}, ValueError, "positive, finite"),
        ({"timeout": float("nan")}, ValueError, "positive, finite"),
        ({"timeout": float("inf")}, ValueError, "positive, finite"),
        ({"timeout": "5"}, TypeError, "number of seconds"),
        ({"timeout": True}, TypeError, "number of seconds"),
        ({"wait": "yes"}, TypeError, "True or False"),
        ({"wait": False, "timeout": 1.0}, ValueError, "needs wait=True"),
    ],
)
def test_bad_wait_options_are_refused(
    db: Database, options: dict[str, Any], error: type[Exception], text: str
) -> None:
    before = db.stats()
    with pytest.raises(error, match=text), db.advisory_lock("job", **options):
        pytest.fail("the body ran")
    assert db.stats() == before


# ------------------------------------------------------------------------------ session


def test_wait_false_raises_at_once_naming_the_holder(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    other.execute("SELECT pg_advisory_lock(%s)", (KEY,))
    ran = False
    with pytest.raises(LockNotAvailable) as info, db.advisory_lock("nightly-import", wait=False):
        ran = True
    assert not ran
    error = info.value
    assert error.holder_pid == other.info.backend_pid
    assert error.holder_application == "other-job"
    assert error.lock == "nightly-import" and error.key == KEY
    message = str(error)
    assert "advisory lock 'nightly-import'" in message
    assert f"pid {other.info.backend_pid}" in message and "'other-job'" in message
    assert "wait=False" in message
    assert not dbkit.is_transient(error)
    # The connection it tried on went back to the pool, healthy and holding nothing.
    assert db.stats().in_use == 0
    assert db.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == 1


def test_int_keys_and_a_holder_in_the_same_process(db: Database, db_url: str) -> None:
    """Two threads of one process are two sessions: the lock keeps them apart too."""
    other_db = Database.from_url(db_url, max_open_conns=2, application_name="thread-b")
    holding, done = threading.Event(), threading.Event()

    def hold() -> int:
        with other_db.advisory_lock(-7) as lock:
            holding.set()
            assert done.wait(PATIENCE)
            return lock.pid

    worker = Worker(hold)
    with other_db:
        worker.start()
        assert holding.wait(PATIENCE)
        try:
            with pytest.raises(LockNotAvailable) as info, db.advisory_lock(-7, wait=False):
                pytest.fail("the body ran")
        finally:
            done.set()
        pid = worker.result()
    assert info.value.holder_pid == pid and info.value.holder_application == "thread-b"
    assert "advisory lock -7 is held" in str(info.value)
    with db.advisory_lock(-7, wait=False) as lock:
        assert lock.key == -7 and lock.scope == "session"


def test_session_lock_is_held_until_the_with_ends(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    with db.advisory_lock("nightly-import") as lock:
        assert lock.scope == "session" and lock.key == KEY
        assert not try_lock(other)
        holder = other.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        ).fetchall()
        assert holder == [(lock.pid,)]
        # Statements of the body run on other connections, outside any transaction.
        assert db.scalar("SELECT pg_backend_pid()") != lock.pid
        assert db.stats().in_use == 1
    assert try_lock(other)
    assert db.stats().in_use == 0


def test_session_lock_is_released_when_the_body_raises(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    with pytest.raises(RuntimeError, match="job failed"), db.advisory_lock("nightly-import"):
        assert not try_lock(other)
        raise RuntimeError("job failed")
    assert try_lock(other)
    # The unlocked connection went back to the pool and holds nothing.
    assert db.stats().in_use == 0
    assert db.scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


@pytest.mark.parametrize("in_block", [False, True], ids=["session", "transaction"])
def test_wait_true_waits_until_the_holder_lets_go(
    db: Database, other: psycopg.Connection[Any], in_block: bool
) -> None:
    other.execute("SELECT pg_advisory_lock(%s)", (KEY,))
    got = threading.Event()

    def take() -> str:
        if in_block:
            with db.transaction(), db.advisory_lock("nightly-import") as lock:
                got.set()
                return lock.scope
        with db.advisory_lock("nightly-import", timeout=PATIENCE) as lock:
            got.set()
            return lock.scope

    worker = Worker(take)
    worker.start()
    try:
        poll(lambda: waiting_for(other) or not worker.is_alive(), "the worker to wait")
        assert not got.is_set(), "granted while another session held it"
        assert worker.is_alive()
    finally:
        other.execute("SELECT pg_advisory_unlock(%s)", (KEY,))
    assert worker.result() == ("transaction" if in_block else "session")
    assert got.is_set()
    assert try_lock(other)


def test_a_bounded_wait_times_out(db: Database, other: psycopg.Connection[Any]) -> None:
    other.execute("SELECT pg_advisory_lock(%s)", (KEY,))
    with pytest.raises(LockNotAvailable) as info, db.advisory_lock("nightly-import", timeout=0.2):
        pytest.fail("the body ran")
    assert "was not granted within 0.2s" in str(info.value)
    assert info.value.holder_pid == other.info.backend_pid
    assert info.value.__cause__ is not None  # PostgreSQL's lock timeout (55P03)
    assert db.stats().in_use == 0
    # The wait's lock_timeout and statement_timeout were local to it.
    with db.transaction() as conn:
        assert conn.scalar(sa.text("SHOW lock_timeout")) == "0"
        assert conn.scalar(sa.text("SHOW statement_timeout")) == "0"


def test_the_wait_is_bounded_by_its_timeout_alone(db_url: str) -> None:
    """A configured statement_timeout shorter than the wait does not cut it short."""
    with (
        Database.from_url(db_url, statement_timeout=0.1) as db,
        psycopg.connect(plain(db_url), autocommit=True) as holder,
    ):
        holder.execute("SELECT pg_advisory_lock(%s)", (KEY,))

        def take() -> str:
            with db.advisory_lock("nightly-import", timeout=PATIENCE) as lock:
                return lock.scope

        worker = Worker(take)
        worker.start()
        try:
            poll(lambda: waiting_for(holder) or not worker.is_alive(), "the worker to wait")
            time.sleep(0.5)  # well past the statement_timeout: the wait must go on
        finally:
            holder.execute("SELECT pg_advisory_unlock_all()")
        assert worker.result() == "session"
        assert db.scalar("SHOW statement_timeout") == "100ms"


def test_a_connection_killed_while_holding_is_not_returned_to_the_pool(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    assert db.stats().open_connections == 1  # connect()'s
    with db.advisory_lock("nightly-import") as lock:
        assert db.stats().in_use == 1
        other.execute("SELECT pg_terminate_backend(%s)", (lock.pid,))
        poll(
            lambda: (
                not other.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (lock.pid,)
                ).fetchall()
            ),
            "the killed backend to exit",
        )
    stats = db.stats()
    assert stats.in_use == 0
    assert stats.open_connections == 0 and stats.idle == 0, "the dead connection was pooled"
    assert try_lock(other)  # its session's end released the lock
    assert db.scalar("SELECT 1") == 1


def test_the_same_thread_can_take_its_session_lock_again(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    with db.advisory_lock("nightly-import") as outer:
        with db.advisory_lock("nightly-import", wait=False) as inner:
            assert inner.pid == outer.pid and inner.scope == "session"
        with db.transaction(), db.advisory_lock("nightly-import", wait=False) as nested:
            assert nested.pid == outer.pid
        assert not try_lock(other)  # the inner exits did not release it
        assert db.stats().in_use == 1
    assert try_lock(other)


# -------------------------------------------------------------------------- transaction


@pytest.mark.parametrize("ending", ["commit", "exception", "set_rollback"])
def test_a_lock_in_a_transaction_lasts_until_the_transaction_ends(
    db: Database, other: psycopg.Connection[Any], ending: str
) -> None:
    with pytest.raises(RuntimeError) if ending == "exception" else contextlib.nullcontext():
        with db.transaction() as conn:
            block_pid = conn.scalar(sa.text("SELECT pg_backend_pid()"))
            with db.advisory_lock("nightly-import") as lock:
                assert lock.scope == "transaction" and lock.pid == block_pid
                assert db.stats().in_use == 1  # the block's own connection, no other
            assert not try_lock(other), "released before the transaction ended"
            with db.transaction():  # a nested block does not end it either
                pass
            assert not try_lock(other)
            if ending == "exception":
                raise RuntimeError("job failed")
            if ending == "set_rollback":
                db.set_rollback(True)
    assert try_lock(other)


def test_wait_false_in_a_transaction_leaves_it_usable(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    db.execute("CREATE TABLE items (n int)")
    other.execute("SELECT pg_advisory_lock(%s)", (KEY,))
    with db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (1)"))
        with pytest.raises(LockNotAvailable, match="held by another session \\(pid"):
            with db.advisory_lock("nightly-import", wait=False):
                pytest.fail("the body ran")
        conn.execute(sa.text("INSERT INTO items VALUES (2)"))
    assert db.scalar("SELECT array_agg(n ORDER BY n) FROM items") == [1, 2]


def test_a_timed_out_wait_in_a_transaction_leaves_it_usable(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    db.execute("CREATE TABLE items (n int)")
    other.execute("SELECT pg_advisory_lock(%s)", (KEY,))
    settings = {"lock_timeout": "7s"}
    with db.transaction(timeout=5, settings=settings) as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (1)"))
        with pytest.raises(LockNotAvailable) as info:
            with db.advisory_lock("nightly-import", timeout=0.2):
                pytest.fail("the body ran")
        assert info.value.holder_pid == other.info.backend_pid
        conn.execute(sa.text("INSERT INTO items VALUES (2)"))
        # Its own lock_timeout and statement_timeout were undone with its savepoint.
        assert conn.scalar(sa.text("SHOW lock_timeout")) == "7s"
        assert conn.scalar(sa.text("SHOW statement_timeout")) == "5s"
        assert not db.get_rollback()
    assert db.scalar("SELECT array_agg(n ORDER BY n) FROM items") == [1, 2]


def test_a_granted_wait_in_a_transaction_puts_the_timeouts_back(db: Database) -> None:
    with db.transaction(timeout=5, settings={"lock_timeout": "7s"}) as conn:
        with db.advisory_lock("nightly-import", timeout=3) as lock:
            assert lock.scope == "transaction"
            assert conn.scalar(sa.text("SHOW lock_timeout")) == "7s"
            assert conn.scalar(sa.text("SHOW statement_timeout")) == "5s"
    with db.transaction() as conn, db.advisory_lock("nightly-import"):
        assert conn.scalar(sa.text("SHOW lock_timeout")) == "0"


def test_retries_do_not_rerun_a_transaction_over_a_lock_not_granted(
    db: Database, other: psycopg.Connection[Any]
) -> None:
    other.execute("SELECT pg_advisory_lock(%s)", (KEY,))
    runs = 0

    def job(conn: Any) -> None:
        nonlocal runs
        runs += 1
        with db.advisory_lock("nightly-import", timeout=0.1):
            pytest.fail("the body ran")

    with pytest.raises(LockNotAvailable):
        db.run_in_transaction(job, retries=3)
    assert runs == 1
    assert not issubclass(LockNotAvailable, RetryableError)
