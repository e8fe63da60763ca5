"""A COMMIT whose answer is lost (DESIGN "Commit outcome"): real connections cut by the
fault proxy right after it forwards COMMIT (the server commits, the client never hears) or
instead of forwarding it (the server rolls back); dbkit asks pg_xact_status and reports
what really happened."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from faultproxy import FaultProxy

import dbkit
from dbkit import CommitOutcomeUnknown, Database, RetryableError


@pytest.fixture
def proxy(pg_server: Any) -> Iterator[FaultProxy]:
    with FaultProxy(pg_server.host, pg_server.port) as fault_proxy:
        yield fault_proxy


def proxied(db_url: str, proxy: FaultProxy, fast_paths: bool, **config: Any) -> Database:
    settings: dict[str, Any] = {
        "max_open_conns": 4,
        "max_idle_conns": 4,
        "fast_paths": fast_paths,
        "health_check_interval": 0,
        "retry_delay": 0.05,
    }
    return Database.from_url(proxy.url_for(db_url), **{**settings, **config}).connect()


@pytest.fixture
def cut(db_url: str, fast_paths: bool, proxy: FaultProxy, db: Database) -> Iterator[Database]:
    """A Database through the proxy; ``db`` (direct) sees the truth."""
    db.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    through = proxied(db_url, proxy, fast_paths)
    yield through
    through.close()


def rows(db: Database) -> list[int]:
    return [r[0] for r in db.execute("SELECT id FROM ledger ORDER BY id")]


def test_a_commit_that_took_effect_is_reported_committed_and_its_callbacks_run(
    cut: Database, proxy: FaultProxy, db: Database
) -> None:
    ran: list[str] = []
    proxy.cut_after_commit()
    with cut.transaction() as conn:
        conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'one')"))
        cut.on_commit(lambda: ran.append("callback"))
    assert proxy.commits_cut_after == 1
    assert rows(db) == [1]
    assert ran == ["callback"]
    assert cut.query_stats().transactions_committed == 1
    assert cut.stats().in_use == 0
    assert cut.scalar("SELECT count(*) FROM ledger") == 1  # the pool recovered


def test_a_commit_that_never_arrived_is_retryable_and_retried_once(
    cut: Database, proxy: FaultProxy, db: Database
) -> None:
    proxy.cut_instead_of_commit()
    with pytest.raises(RetryableError, match="rolled back") as info, cut.transaction() as conn:
        conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'one')"))
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)
    assert rows(db) == []

    runs: list[int] = []
    proxy.cut_instead_of_commit()

    @cut.transaction(retries=3)
    def insert() -> None:
        runs.append(1)
        cut.execute("INSERT INTO ledger VALUES (2, 'two')")

    insert()
    assert runs == [1, 1]
    assert rows(db) == [2]


def test_a_retried_transaction_whose_commit_took_effect_is_not_run_again(
    cut: Database, proxy: FaultProxy, db: Database
) -> None:
    runs: list[int] = []
    proxy.cut_after_commit()

    def insert(conn: sa.Connection) -> None:
        runs.append(1)
        conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'once')"))

    cut.run_in_transaction(insert, retries=5)
    assert runs == [1]
    assert rows(db) == [1]


def test_the_id_asked_right_after_the_only_write_is_in_hand_before_commit(
    cut: Database, proxy: FaultProxy, db: Database
) -> None:
    """A write as the block's last statement: the question for the id (sent with it on the
    fast path) must be answered before COMMIT leaves."""
    for i in range(5):
        proxy.cut_after_commit()
        with cut.transaction() as conn:
            conn.execute(sa.text("SELECT 1"))
            conn.execute(sa.text("INSERT INTO ledger VALUES (:i, 'x')"), {"i": i})
    assert rows(db) == [0, 1, 2, 3, 4]


def test_a_transaction_that_wrote_nothing_ends_normally(cut: Database, proxy: FaultProxy) -> None:
    for readonly in (None, True):
        proxy.cut_after_commit()
        with cut.transaction(readonly=readonly) as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 0
        assert proxy.commits_cut_after == (1 if readonly is None else 2)


def test_without_resolution_a_lost_commit_is_unknown_and_never_retried(
    db_url: str, fast_paths: bool, proxy: FaultProxy, db: Database
) -> None:
    db.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    blind = proxied(db_url, proxy, fast_paths, resolve_commit_outcome=False)
    runs: list[int] = []
    try:
        proxy.cut_after_commit()

        def insert(conn: sa.Connection) -> None:
            runs.append(1)
            conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'one')"))

        with pytest.raises(CommitOutcomeUnknown) as info:
            blind.run_in_transaction(insert, retries=5)
        assert info.value.xid is None
        assert isinstance(info.value, dbkit.TransactionError)
        assert not dbkit.is_transient(info.value)
        assert runs == [1]
        assert rows(db) == [1]  # it did commit: only resolution could have said so
    finally:
        blind.close()


def slow_commit(db: Database) -> None:
    """Commits of rows with note 'slow' take about 1.5 s (a deferred trigger sleeps)."""
    db.execute(
        """
        CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON ledger DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW WHEN (NEW.note = 'slow') EXECUTE FUNCTION slow();
        """
    )


def test_a_commit_still_in_progress_is_waited_for(
    cut: Database, proxy: FaultProxy, db: Database
) -> None:
    slow_commit(db)
    proxy.cut_after_commit()
    with cut.transaction() as conn:  # timeout (5 s) bounds the wait for "in progress"
        conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'slow')"))
    assert rows(db) == [1]


def test_a_commit_in_progress_past_the_timeout_is_unknown_with_its_xid(
    db_url: str, fast_paths: bool, proxy: FaultProxy, db: Database
) -> None:
    db.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    slow_commit(db)
    impatient = proxied(db_url, proxy, fast_paths, timeout=0.3)
    try:
        proxy.cut_after_commit()
        with pytest.raises(CommitOutcomeUnknown) as info, impatient.transaction() as conn:
            conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'slow')"))
        xid = info.value.xid
        assert isinstance(xid, int) and xid > 0
        assert f"pg_xact_status('{xid}')" in str(info.value)
        # The truth arrives later, and the xid lets the caller find it.
        done = threading.Event()
        for _ in range(100):
            status = db.scalar("SELECT pg_xact_status(CAST(:x AS text)::xid8)", {"x": str(xid)})
            if status != "in progress":
                break
            done.wait(0.05)
        assert status == "committed"
        assert rows(db) == [1]
    finally:
        impatient.close()


def test_a_server_crash_during_commit_is_resolved_after_recovery(
    make_server: Any, fast_paths: bool
) -> None:
    """COMMIT forwarded, then the server crashes (immediate stop) while the commit is under
    way: after recovery pg_xact_status says aborted (or committed, if the crash came late),
    and the work is saved exactly once either way."""
    server = make_server(synchronous_commit="on")
    with FaultProxy(server.host, server.port) as proxy:
        db = Database.from_url(
            proxy.url_for(server.url),
            fast_paths=fast_paths,
            health_check_interval=0,
            retry_delay=0.1,
            max_retries=10,
        ).connect()
        errors: list[BaseException] = []

        def crash_when_the_commit_is_cut() -> None:
            try:
                while proxy.commits_cut_after == 0:
                    threading.Event().wait(0.005)
                server.kill()
                server.start()
            except BaseException as error:
                errors.append(error)

        try:
            db.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
            slow_commit(db)
            crasher = threading.Thread(target=crash_when_the_commit_is_cut)
            crasher.start()
            runs: list[int] = []

            def insert(conn: sa.Connection) -> None:
                runs.append(1)
                conn.execute(sa.text("INSERT INTO ledger VALUES (1, 'slow')"))

            proxy.cut_after_commit()
            db.run_in_transaction(insert, retries=3)
            crasher.join(timeout=60)
            assert not errors
            assert runs in ([1], [1, 1])
            assert db.scalar("SELECT count(*) FROM ledger") == 1
        finally:
            db.close()
