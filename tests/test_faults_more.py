"""More real faults: a backend killed in the middle of a COPY or of a server-side cursor,
``close()`` while other threads hold or wait for connections, ``fork()`` with a transaction
open in the parent and batch jobs on ``multiprocessing``, a serialization failure and a
deferred constraint raised by COMMIT itself, and the classification of lock timeouts
(55P03) and of writes in a read-only block (25006).

Every fault is real: backends are ended with ``pg_terminate_backend`` from a separate admin
connection, processes are really forked or spawned, PostgreSQL really raises the errors.
Threads record their exceptions and the test asserts on them; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import dbkit
from dbkit import (
    Database,
    DbkitError,
    DuplicateKeyError,
    ForeignKeyError,
    IntegrityError,
    RetryableError,
)
from dbkit.errors import is_transient, sqlstate_of

WAIT = 30.0  # bound on any wait for another thread or process (generous: loaded machines)

metadata = sa.MetaData()
loaded = sa.Table(
    "loaded",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("payload", sa.Text, nullable=False),
)
children = sa.Table(
    "children",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("parent_id", sa.Integer, nullable=False),
)
tags = sa.Table(
    "tags",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
)
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("worker_pid", sa.Integer, nullable=False),
    sa.Column("backend_pid", sa.Integer, nullable=False),
)


class Loaded(dbkit.Repository[dict[str, Any]]):
    table = loaded


class Children(dbkit.Repository[dict[str, Any]]):
    table = children


class Tags(dbkit.Repository[dict[str, Any]]):
    table = tags


class Jobs(dbkit.Repository[dict[str, Any]]):
    table = jobs


# -- helpers -------------------------------------------------------------------------------


def admin(db_url: str) -> psycopg.Connection[Any]:
    """A plain psycopg connection in autocommit, outside any dbkit pool."""
    return psycopg.connect(
        db_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
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


def waited(event: threading.Event, what: str, timeout: float = WAIT) -> None:
    """``event.wait`` that fails loudly instead of going on when the other side never came."""
    if not event.wait(timeout):
        raise AssertionError(f"timed out waiting for {what}")


def caught(action: Callable[[], Any]) -> BaseException:
    try:
        action()
    except BaseException as error:
        return error
    raise AssertionError("expected an error")


def chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes, outermost first."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(found) < 20:
        found.append(current)
        current = current.__cause__
    return found


def lost_connection(error: BaseException) -> bool:
    """Somewhere in the chain, SQLAlchemy's word that the connection is gone (it was
    invalidated: the pool will never hand it out again)."""
    return any(isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated for e in chain(error))


def backends(conn: psycopg.Connection[Any], app: str) -> list[tuple[int, str]]:
    """(pid, state) of every server backend with this application_name."""
    return [
        (pid, state)
        for pid, state in conn.execute(
            "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        )
    ]


def assert_pool_clean(db: Database, repo: Loaded, other: psycopg.Connection[Any], app: str) -> None:
    """After a fault: nothing checked out, no block open in this thread, no backend of
    this Database left inside a transaction, and the next statements work."""
    assert db.stats().in_use == 0
    assert not db.in_transaction()
    assert not [b for b in backends(other, app) if b[1].startswith("idle in transaction")]
    assert db.scalar("SELECT 1") == 1
    with db.transaction():  # a fresh transaction on a sound connection
        assert repo.bulk_load([(1, "after")]) == 1
    assert db.scalar("SELECT count(*) FROM loaded") == 1
    assert db.stats().in_use == 0


@pytest.fixture
def app(request: pytest.FixtureRequest) -> str:
    """An application_name unique to this test (its backends are found by it)."""
    return f"fm-{zlib.crc32(request.node.nodeid.encode()):08x}"


# -- 1. a backend killed during COPY FROM STDIN and during a server-side cursor ---------------


@pytest.mark.parametrize("in_block", [False, True], ids=["own-transaction", "in-block"])
def test_backend_killed_during_bulk_load(db_url: str, app: str, in_block: bool) -> None:
    """``repo.bulk_load`` whose backend is terminated while rows stream in: dbkit's
    ``RetryableError`` (the COPY's transaction was rolled back; run it again), no row
    committed, the dead connection discarded and the pool ready for the next caller."""
    db = Database.from_url(db_url, max_open_conns=3, application_name=app).connect()
    try:
        db.execute("CREATE TABLE loaded (id int PRIMARY KEY, payload text NOT NULL)")
        repo = Loaded(db)
        with admin(db_url) as other:
            killed: list[bool] = []
            backend: list[int] = []

            def terminate() -> bool:
                args: tuple[Any, ...]
                if backend:  # the loading block's own backend, found with pg_backend_pid()
                    sql, args = "SELECT pg_terminate_backend(%s, 30000)", (backend[0],)
                else:  # the COPY that bulk_load runs in a transaction of its own
                    sql = (
                        "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity "
                        "WHERE application_name = %s AND state = 'active' "
                        "AND query LIKE 'COPY %%'"
                    )
                    args = (app,)
                return [r for (r,) in other.execute(sql, args)] == [True]

            def rows() -> Iterator[tuple[int, str]]:
                for i in range(2_000_000):
                    if i == 1000:  # the COPY is under way: its first rows were written
                        killed.append(terminate())
                    yield (i, "x" * 100)

            def load() -> None:
                if in_block:
                    with db.transaction():
                        db.execute("INSERT INTO loaded VALUES (-1, 'before the COPY')")
                        backend.append(db.scalar("SELECT pg_backend_pid()"))
                        repo.bulk_load(rows())
                else:
                    repo.bulk_load(rows())

            error = caught(load)
            assert killed == [True], "the loading backend was not found and terminated"
            assert isinstance(error, RetryableError), repr(error)
            assert is_transient(error)
            assert lost_connection(error), chain(error)
            assert db.stats().invalidated == 1
            assert db.scalar("SELECT count(*) FROM loaded") == 0  # nothing committed
            assert_pool_clean(db, repo, other, app)
    finally:
        db.close()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
@pytest.mark.parametrize("in_block", [False, True], ids=["own-transaction", "in-block"])
def test_backend_killed_while_iterating_a_stream(
    db_url: str, app: str, in_block: bool, fast: bool
) -> None:
    """``repo.stream`` whose backend is terminated between two FETCHes: a transient error
    naming the cause (inside a block, dbkit's ``RetryableError``), the block's writes not
    committed, the pool clean."""
    db = Database.from_url(db_url, max_open_conns=3, application_name=app, fast_paths=fast)
    db.connect()
    try:
        db.execute("CREATE TABLE loaded (id int PRIMARY KEY, payload text NOT NULL)")
        db.execute("INSERT INTO loaded SELECT g, 'x' FROM generate_series(1, 5000) g")
        repo = Loaded(db)
        seen = 0
        killed: list[bool] = []
        with admin(db_url) as other:

            def terminate(pid: int | None) -> bool:
                if pid is not None:
                    found = other.execute("SELECT pg_terminate_backend(%s, 30000)", (pid,))
                else:  # the stream's private transaction: the only one open for this app
                    found = other.execute(
                        "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity "
                        "WHERE application_name = %s AND state = 'idle in transaction'",
                        (app,),
                    )
                return [r for (r,) in found] == [True]

            def iterate() -> None:
                nonlocal seen
                with db.transaction() if in_block else contextlib.nullcontext():
                    pid = None
                    if in_block:
                        db.execute("DELETE FROM loaded WHERE id <= 10")  # must not commit
                        pid = db.scalar("SELECT pg_backend_pid()")
                    for _ in repo.stream(order_by="id", batch_size=100):
                        seen += 1
                        if seen == 150:  # inside the second batch
                            killed.append(terminate(pid))

            error = caught(iterate)
            assert killed == [True], "the streaming backend was not found and terminated"
            assert 150 <= seen < 5000
            # dbkit's own error inside a block; outside one, the driver error wrapped by
            # SQLAlchemy as for db.execute: transient, with PostgreSQL's reason.
            assert isinstance(error, RetryableError if in_block else sa.exc.OperationalError), repr(
                error
            )
            assert is_transient(error)
            assert lost_connection(error), chain(error)
            assert db.stats().invalidated == 1
            assert db.scalar("SELECT count(*) FROM loaded") == 5000  # the DELETE rolled back
            db.execute("DELETE FROM loaded")
            assert_pool_clean(db, repo, other, app)
    finally:
        db.close()


# -- 2. close() while other threads hold or wait for connections ------------------------------


def blocked_in_checkout(thread: threading.Thread) -> bool:
    """Whether ``thread`` is waiting in the pool's queue for a connection to come back
    (SQLAlchemy's ``Queue.get`` or dbkit's ``HandoffQueue.get``)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_qualname.endswith("Queue.get"):
            return True
        frame = frame.f_back
    return False


def test_close_while_threads_hold_and_wait_for_connections(db_url: str, app: str) -> None:
    """max_open_conns=2: two threads inside transactions hold both connections, a third
    waits for one; the main thread calls ``close()``.

    Expected: close returns at once (it does not wait for the holders); the holders'
    transactions, already under way, finish and commit; the waiter is woken with dbkit's
    ``ConnectError`` (the Database is closed) without waiting for a holder or for the pool
    timeout, and never runs its work; every connection is closed when it comes back, so no
    backend of this Database remains on the server."""
    db = Database.from_url(
        db_url, max_open_conns=2, max_idle_conns=2, timeout=120, application_name=app
    ).connect()
    db.execute("CREATE TABLE items (k text NOT NULL)")
    # With fast paths off (public API only) a waiting thread cannot be woken by close():
    # it learns that the Database is closed when a holder returns its connection.
    fast = db.driver_path() is not None
    holding = threading.Barrier(3, timeout=WAIT)
    release = threading.Event()
    outcome: dict[str, Any] = {}

    def holder(name: str) -> None:
        try:
            with db.transaction() as conn:
                conn.exec_driver_sql(f"INSERT INTO items VALUES ('{name}-1')")
                holding.wait()
                waited(release, "the end of the test's close()", timeout=4 * WAIT)
                conn.exec_driver_sql(f"INSERT INTO items VALUES ('{name}-2')")
            outcome[name] = "committed"
        except BaseException as error:
            outcome[name] = error

    def waiter() -> None:
        try:
            with db.transaction() as conn:
                conn.exec_driver_sql("INSERT INTO items VALUES ('waiter')")
            outcome["waiter"] = "committed"
        except BaseException as error:
            outcome["waiter"] = error

    holders = [threading.Thread(target=holder, args=(f"h{i}",)) for i in range(2)]
    for t in holders:
        t.start()
    try:
        holding.wait()
        waiting = threading.Thread(target=waiter)
        waiting.start()
        wait_for(lambda: blocked_in_checkout(waiting), "the third thread to wait for a connection")

        closer = threading.Thread(target=db.close)
        closer.start()
        closer.join(WAIT)
        outcome["close returned"] = not closer.is_alive()
        # The holders still hold (for up to 4 * WAIT): only close() can end the waiter's
        # wait now.
        waiting.join(WAIT)
        outcome["waiter woken by close"] = not waiting.is_alive()
    finally:
        release.set()
        join_all([*holders, waiting], timeout=180)
    waiter_error = outcome.pop("waiter")
    outcome["waiter"] = (
        "ConnectError"
        if isinstance(waiter_error, dbkit.ConnectError)
        else repr(waiter_error)  # "'committed'" when it ran its work after close()
    )
    with admin(db_url) as other:
        outcome["rows"] = sorted(k for (k,) in other.execute("SELECT k FROM items"))
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not backends(other, app), "the closed Database's backends", timeout=15)
        outcome["backends left"] = backends(other, app)
    outcome["in use"] = db.stats().in_use
    assert outcome == {
        "close returned": True,
        "h0": "committed",
        "h1": "committed",
        "waiter": "ConnectError",
        "waiter woken by close": fast,
        "rows": ["h0-1", "h0-2", "h1-1", "h1-2"],
        "backends left": [],
        "in use": 0,
    }
    with pytest.raises(dbkit.ConnectError):  # closed: no new work
        db.execute("SELECT 1")


# -- 3. fork() with a transaction open in the parent; multiprocessing --------------------------


def run_in_child(child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; run ``child()`` in the child and bring back what it returns (or its error).
    The child leaves with ``os._exit``: none of pytest's or the parent's cleanup runs there."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_end)
            try:
                result = child()
            except BaseException as error:
                result, code = {"error": repr(error)}, 1
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish")
        time.sleep(0.02)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    found: dict[str, Any] = json.loads(data) if data else {"error": "no answer"}
    found["exit code"] = os.waitstatus_to_exitcode(status)
    return found


def test_fork_with_an_open_transaction_in_the_parent(db: Database) -> None:
    """The child of a process inside ``with db.transaction()`` is not inside it: its
    statements run on a new connection of its own, outside the parent's transaction (they
    do not see the parent's uncommitted row, and the parent does not commit theirs); the
    parent's connection is untouched and its transaction commits."""
    db.execute("CREATE TABLE forked (who text NOT NULL, backend int NOT NULL)")
    with db.transaction():
        db.execute("INSERT INTO forked VALUES ('parent', pg_backend_pid())")
        parent_backend = db.scalar("SELECT pg_backend_pid()")
        parent_xid = db.scalar("SELECT txid_current()")

        def child() -> dict[str, Any]:
            in_transaction = db.in_transaction()
            backend = db.scalar("SELECT pg_backend_pid()")
            visible = db.scalar("SELECT count(*) FROM forked")
            db.execute("INSERT INTO forked VALUES ('child', pg_backend_pid())")
            return {
                "in transaction": in_transaction,
                "own backend": backend != parent_backend,
                "sees the parent's uncommitted row": visible != 0,
                "in the parent's transaction": db.scalar("SELECT txid_current_if_assigned()")
                == parent_xid,
            }

        found = run_in_child(child)
        # The parent goes on, on the same connection and in the same transaction.
        assert db.scalar("SELECT pg_backend_pid()") == parent_backend
        assert db.scalar("SELECT txid_current()") == parent_xid
        db.execute("INSERT INTO forked VALUES ('parent, after the fork', pg_backend_pid())")
    assert found == {
        "in transaction": False,
        "own backend": True,
        "sees the parent's uncommitted row": False,
        "in the parent's transaction": False,
        "exit code": 0,
    }
    rows = db.execute("SELECT who, backend FROM forked ORDER BY who").all()
    assert [r.who for r in rows] == ["child", "parent", "parent, after the fork"]
    assert rows[0].backend != parent_backend  # the child's row came from its own session
    assert rows[1].backend == rows[2].backend == parent_backend
    assert db.stats().in_use == 0


# The recommended pattern for batch jobs (README "Batch jobs with multiprocessing"): one
# Database per worker process, made by the pool's initializer and closed when it exits.
_worker_db: Database | None = None


def _init_worker(url: str) -> None:
    global _worker_db
    _worker_db = Database.from_url(url, max_open_conns=2, application_name="fm-worker").connect()
    multiprocessing.util.Finalize(None, _worker_db.close, exitpriority=10)


def _load_chunk(ids: list[int]) -> tuple[int, int]:
    assert _worker_db is not None, "the initializer did not run"
    backend = _worker_db.scalar("SELECT pg_backend_pid()")
    with _worker_db.transaction():
        Jobs(_worker_db).insert_many(
            [{"id": i, "worker_pid": os.getpid(), "backend_pid": backend} for i in ids]
        )
    return os.getpid(), backend


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_batch_with_a_database_per_worker(
    db: Database, db_url: str, method: str
) -> None:
    db.execute(
        "CREATE TABLE jobs (id int PRIMARY KEY, worker_pid int NOT NULL, backend_pid int NOT NULL)"
    )
    parent_backend = db.scalar("SELECT pg_backend_pid()")  # a pooled connection, inherited
    chunks = [list(range(start, start + 250)) for start in range(0, 2000, 250)]
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(processes=2, initializer=_init_worker, initargs=(db_url,)) as pool:
        done = pool.map_async(_load_chunk, chunks).get(timeout=180)
        pool.close()
        pool.join()
    workers = {worker for worker, _ in done}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    assert parent_backend not in {backend for _, backend in done}
    assert db.scalar("SELECT count(*) FROM jobs") == 2000
    assert db.scalar("SELECT count(DISTINCT id) FROM jobs") == 2000
    assert {w for (w,) in db.execute("SELECT DISTINCT worker_pid FROM jobs")} == workers
    # The parent's own pooled connection came through the workers' lives untouched.
    assert db.scalar("SELECT pg_backend_pid()") == parent_backend
    assert db.stats().invalidated == 0


# -- 4. a serialization failure raised by COMMIT ---------------------------------------------


@pytest.fixture
def doctors(db: Database) -> Database:
    """Two doctors on call; the rule is that at least one stays on call (write skew)."""
    db.execute("CREATE TABLE doctors (id int PRIMARY KEY, on_call bool NOT NULL)")
    db.execute("INSERT INTO doctors VALUES (1, true), (2, true)")
    return db


class Skew:
    """The steps of two serializable transactions that each see two doctors on call and
    take a different one off call.  A reads, B reads, A writes, B writes, A commits, then B
    commits: PostgreSQL's SSI lets both statements through (no one had committed yet) and
    cancels B at its COMMIT ("… during commit attempt")."""

    def __init__(self) -> None:
        self.a_read = threading.Event()
        self.b_read = threading.Event()
        self.a_wrote = threading.Event()
        self.b_wrote = threading.Event()
        self.a_done = threading.Event()
        self.a_outcome: list[BaseException | None] = []

    def run_a(self, db: Database) -> None:
        try:
            with db.transaction(isolation="serializable") as conn:
                conn.execute(sa.text("SELECT count(*) FROM doctors WHERE on_call")).scalar_one()
                self.a_read.set()
                waited(self.b_read, "B's read")
                conn.execute(sa.text("UPDATE doctors SET on_call = false WHERE id = 1"))
                self.a_wrote.set()
                waited(self.b_wrote, "B's write")
            self.a_outcome.append(None)
        except BaseException as error:
            self.a_outcome.append(error)
        finally:
            self.a_done.set()

    def b_body(self, conn: sa.Connection) -> None:
        """B's work up to (not including) its COMMIT."""
        waited(self.a_read, "A's read")
        conn.execute(sa.text("SELECT count(*) FROM doctors WHERE on_call")).scalar_one()
        self.b_read.set()
        waited(self.a_wrote, "A's write")
        conn.execute(sa.text("UPDATE doctors SET on_call = false WHERE id = 2"))
        self.b_wrote.set()
        waited(self.a_done, "A's commit")


def psycopg_error(error: BaseException) -> psycopg.Error:
    [found] = [e for e in chain(error) if isinstance(e, psycopg.Error)]
    return found


def on_call(db: Database) -> list[tuple[int, bool]]:
    return [tuple(r) for r in db.execute("SELECT id, on_call FROM doctors ORDER BY id")]


def test_serialization_failure_at_commit_is_a_retryable_error(doctors: Database) -> None:
    db = doctors
    skew = Skew()
    a = threading.Thread(target=skew.run_a, args=(db,))
    a.start()
    body_done = False
    error: BaseException | None = None
    try:
        with db.transaction(isolation="serializable") as conn:
            skew.b_body(conn)
            body_done = True  # every statement of the block succeeded: what fails is COMMIT
    except BaseException as exc:
        error = exc
    finally:
        skew.b_read.set()  # never leave A waiting, whatever happened here
        skew.b_wrote.set()
        join_all([a])
    assert skew.a_outcome == [None]  # A committed
    assert body_done, f"B failed before its COMMIT: {error!r}"
    assert isinstance(error, RetryableError), repr(error)
    assert sqlstate_of(error) == "40001"
    detail = psycopg_error(error).diag.message_detail or ""
    assert "commit attempt" in detail, detail
    assert on_call(db) == [(1, False), (2, True)]  # B's write was rolled back
    assert db.stats().in_use == 0


def test_serialization_failure_at_commit_is_retried(doctors: Database) -> None:
    db = doctors
    skew = Skew()
    attempts: list[bool] = []  # per attempt: whether its body ran to the end

    @db.transaction(retries=2, isolation="serializable")
    def go_off_call(doctor: int) -> str:
        conn = db.connection()
        assert conn is not None
        attempts.append(False)
        if len(attempts) == 1:
            skew.b_body(conn)  # reads two on call, takes doctor 2 off; fails at COMMIT
            attempts[-1] = True
            return "off call"
        others = conn.execute(
            sa.text("SELECT count(*) FROM doctors WHERE on_call AND id <> :id"), {"id": doctor}
        ).scalar_one()
        attempts[-1] = True
        if others == 0:
            return "stays on call"  # the re-run sees A's commit and keeps the rule
        conn.execute(sa.text("UPDATE doctors SET on_call = false WHERE id = :id"), {"id": doctor})
        return "off call"

    a = threading.Thread(target=skew.run_a, args=(db,))
    a.start()
    try:
        result = go_off_call(2)
    finally:
        skew.b_read.set()
        skew.b_wrote.set()
        join_all([a])
    assert skew.a_outcome == [None]
    assert attempts == [True, True]  # the first run's body finished: its COMMIT failed
    assert result == "stays on call"
    assert on_call(db) == [(1, False), (2, True)]
    assert db.query_stats().transactions_retried == 1
    assert db.stats().in_use == 0


# -- 5. a deferred constraint violated at COMMIT under retries= ------------------------------


@pytest.mark.parametrize("kind", ["foreign-key", "unique"])
def test_deferred_constraint_failing_at_commit_is_translated_and_not_retried(
    db: Database, kind: str
) -> None:
    db.execute("CREATE TABLE parents (id int PRIMARY KEY)")
    db.execute(
        "CREATE TABLE children (id int PRIMARY KEY, parent_id int NOT NULL"
        " CONSTRAINT children_parent_fk REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    db.execute(
        "CREATE TABLE tags (id int PRIMARY KEY, name text NOT NULL,"
        " CONSTRAINT tags_name_key UNIQUE (name) DEFERRABLE INITIALLY DEFERRED)"
    )
    db.execute("INSERT INTO tags VALUES (1, 'urgent')")
    runs: list[bool] = []  # per run: whether its body ran to the end

    @db.transaction(retries=2)
    def write() -> None:
        runs.append(False)
        if kind == "foreign-key":
            Children(db).add({"id": 1, "parent_id": 999})  # no such parent: checked at COMMIT
        else:
            Tags(db).add({"id": 2, "name": "urgent"})  # a duplicate: checked at COMMIT
        runs[-1] = True

    error = caught(write)
    assert runs == [True], "the body ran more than once, or failed before COMMIT"
    expected: type[IntegrityError]
    expected, sqlstate, constraint = {
        "foreign-key": (ForeignKeyError, "23503", "children_parent_fk"),
        "unique": (DuplicateKeyError, "23505", "tags_name_key"),
    }[kind]
    assert sqlstate_of(error) == sqlstate
    assert not is_transient(error)
    assert isinstance(error, expected), repr(error)
    assert error.constraint == constraint
    assert db.scalar("SELECT count(*) FROM children") == 0
    assert db.scalar("SELECT count(*) FROM tags") == 1
    assert db.query_stats().transactions_retried == 0
    assert db.stats().in_use == 0


# -- 6. classification: 55P03 lock_not_available, 25006 read_only_sql_transaction ----------


@pytest.fixture
def locked_row(db: Database, db_url: str) -> Iterator[None]:
    """Row 1 of ``locked`` held FOR UPDATE by another session for the whole test."""
    db.execute("CREATE TABLE locked (id int PRIMARY KEY)")
    db.execute("INSERT INTO locked VALUES (1)")
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as holder:
        holder.execute("SELECT id FROM locked WHERE id = 1 FOR UPDATE")
        yield
        holder.rollback()


@pytest.mark.usefixtures("locked_row")
def test_lock_not_available_with_nowait_is_transient(db: Database) -> None:
    error = caught(lambda: db.execute("SELECT id FROM locked WHERE id = 1 FOR UPDATE NOWAIT"))
    assert sqlstate_of(error) == "55P03"
    assert is_transient(error), repr(error)
    assert db.stats().in_use == 0


@pytest.mark.usefixtures("locked_row")
def test_lock_timeout_in_a_block_is_transient(db: Database) -> None:
    def wait_for_the_lock() -> None:
        with db.transaction():
            db.execute("SET LOCAL lock_timeout = '10ms'")
            db.execute("SELECT id FROM locked WHERE id = 1 FOR UPDATE")

    error = caught(wait_for_the_lock)
    assert sqlstate_of(error) == "55P03"
    assert "lock timeout" in str(psycopg_error(error))
    assert is_transient(error), repr(error)
    assert not db.in_transaction() and db.stats().in_use == 0


@pytest.mark.parametrize("nested", [False, True], ids=["outermost", "nested"])
def test_write_in_a_block_declared_read_only_is_not_transient(db: Database, nested: bool) -> None:
    """25006 in a block the application itself declared read-only is a programming error:
    not transient, not retryable (unlike a write refused by a server that became a
    standby under a stale connection)."""
    db.execute("CREATE TABLE notes (id int PRIMARY KEY)")

    def write() -> None:
        with db.transaction() if nested else contextlib.nullcontext():
            with db.transaction(readonly=True):
                db.execute("INSERT INTO notes VALUES (1)")

    error = caught(write)
    assert sqlstate_of(error) == "25006"
    assert not is_transient(error), repr(error)
    assert not isinstance(error, RetryableError)
    assert isinstance(error, (sa.exc.DBAPIError, DbkitError))
    assert db.scalar("SELECT count(*) FROM notes") == 0
    assert not db.in_transaction() and db.stats().in_use == 0
